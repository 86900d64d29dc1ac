//! TLS to PostgreSQL and Redis (`database.sslmode`, `database.ca_file`, `rediss://`,
//! `redis.ca_file`), against servers the tests start themselves with TLS on: a throwaway
//! `initdb` cluster on a free port whose `pg_hba.conf` refuses every connection without
//! TLS, and a `redis-server` with only a TLS port. Their certificates are made here, by
//! a CA made here; another CA made here is the wrong one. The machine's own services
//! are never touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::SecretString;
use tessera::config::{PgTls, Settings};

use crate::helpers::{eventually, free_port, server_binary, spawn_app_with, test_settings};

/// A CA, a certificate it signed for 127.0.0.1 and localhost, and its key, in a
/// directory; plus a second CA that signed nothing here.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = std::env::temp_dir().join(format!("tessera-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, cert, key) = crate::smtp::certificates();
        let (wrong_ca, _, _) = crate::smtp::certificates();
        std::fs::write(dir.join("ca.pem"), ca).unwrap();
        std::fs::write(dir.join("wrong-ca.pem"), wrong_ca).unwrap();
        std::fs::write(dir.join("server.crt"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        Certificates { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn wrong_ca(&self) -> PathBuf {
        self.dir.join("wrong-ca.pem")
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The OS account PostgreSQL's programs run as: this one, or `postgres` when this is
/// root (initdb and postgres refuse to run as root).
fn postgres_account() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    if uid != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("an OS account named postgres (Debian's postgresql package makes it)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// Where `initdb` and `postgres` are: Debian keeps them off the PATH.
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|bin| {
        let version = bin.parent().unwrap().file_name().unwrap().to_string_lossy();
        version.parse::<u32>().unwrap_or(0)
    });
    found
        .pop()
        .expect("PostgreSQL's server programs under /usr/lib/postgresql/*/bin (scripts/services.sh installs them)")
}

/// A PostgreSQL cluster of the test's own that takes TLS connections only, removed on
/// drop.
struct TlsPostgres {
    dir: PathBuf,
    port: u16,
    account: Option<(u32, u32)>,
}

impl TlsPostgres {
    fn start(certs: &Certificates) -> TlsPostgres {
        let account = postgres_account();
        let dir = std::env::temp_dir().join(format!("tessera-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let pg = TlsPostgres {
            dir,
            port: free_port(),
            account,
        };
        pg.own(&pg.dir);
        let data = pg.dir.join("data");
        pg.run("initdb", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        });
        for file in ["server.crt", "server.key"] {
            std::fs::copy(certs.dir.join(file), data.join(file)).unwrap();
            pg.own(&data.join(file));
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c fsync=off",
            pg.port,
            pg.dir.display()
        );
        pg.run("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(pg.dir.join("log"))
                .arg("start");
        });
        pg
    }

    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.account {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }

    fn run(&self, program: &str, args: impl FnOnce(&mut Command)) {
        let mut cmd = Command::new(postgres_bin().join(program));
        args(&mut cmd);
        cmd.current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.account {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/tessera", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut cmd = Command::new(postgres_bin().join("pg_ctl"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.account {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let _ = cmd.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Settings on `pg` with `sslmode` and `ca_file`; revocations in process.
fn on_postgres(pg: &TlsPostgres, sslmode: Option<PgTls>, ca_file: &Path) -> Settings {
    let mut s = test_settings();
    s.database.url = SecretString::from(pg.url());
    s.database.sslmode = sslmode;
    s.database.ca_file = ca_file.to_owned();
    s.redis.url = SecretString::from(String::new());
    s
}

/// What `tessera serve` prints when it stops at once (or panics if it keeps running).
fn serve_fails(settings: &Settings) -> String {
    let (mut cmd, log) = server_binary(settings);
    cmd.env("TESSERA__DATABASE__CA_FILE", &settings.database.ca_file)
        .env("TESSERA__REDIS__CA_FILE", &settings.redis.ca_file);
    if let Some(mode) = settings.database.sslmode {
        let mode = match mode {
            PgTls::Disable => "disable",
            PgTls::Prefer => "prefer",
            PgTls::Require => "require",
            PgTls::VerifyCa => "verify-ca",
            PgTls::VerifyFull => "verify-full",
        };
        cmd.env("TESSERA__DATABASE__SSLMODE", mode);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tessera serve kept running: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let printed = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success(), "{printed}");
    printed
}

/// A user can register, log in and refresh: every request path reaches the store.
async fn serves_logins(settings: Settings) {
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    app.refresh_ok(&tokens.refresh).await;
    ready_then_stop(app).await;
}

async fn ready_then_stop(app: crate::helpers::TestApp) {
    let res = app.get("/health/ready").await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "{}",
        res.text().await.unwrap()
    );
    app.stop().await;
}

#[tokio::test]
async fn postgres_over_tls_checks_the_certificate_against_the_ca_given() {
    crate::shared_backend_only!();
    let certs = Certificates::make();
    let pg = TlsPostgres::start(&certs);

    // The wrong CA: the server refuses to start and says what to check.
    let printed = serve_fails(&on_postgres(
        &pg,
        Some(PgTls::VerifyFull),
        &certs.wrong_ca(),
    ));
    assert!(printed.contains("TLS with PostgreSQL failed"), "{printed}");
    assert!(printed.contains("database.ca_file"), "{printed}");
    assert!(printed.contains("certificate"), "{printed}");

    // Without TLS the cluster refuses the connection: what works below is TLS.
    let printed = serve_fails(&on_postgres(&pg, Some(PgTls::Disable), Path::new("")));
    assert!(printed.contains("no encryption"), "{printed}");

    // The right CA, host name checked: logins and refreshes work.
    serves_logins(on_postgres(&pg, Some(PgTls::VerifyFull), &certs.ca())).await;
    // "require" with a CA file checks the chain as verify-ca (as libpq does): the
    // wrong CA is refused there too.
    let printed = serve_fails(&on_postgres(&pg, Some(PgTls::Require), &certs.wrong_ca()));
    assert!(printed.contains("TLS with PostgreSQL failed"), "{printed}");
    // And "require" without one encrypts without checking.
    serves_logins(on_postgres(&pg, Some(PgTls::Require), Path::new(""))).await;
}

/// A `redis-server` of the test's own with only a TLS port, stopped on drop.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
}

impl TlsRedis {
    async fn start(certs: &Certificates) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(certs.dir.join("server.crt"))
            .arg("--tls-key-file")
            .arg(certs.dir.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(certs.ca())
            .args(["--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/services.sh installs it)");
        eventually("the TLS Redis listens", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        TlsRedis { port, child }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_redis(redis: &TlsRedis, ca_file: &Path) -> Settings {
    let mut s = test_settings();
    s.redis.url = SecretString::from(redis.url());
    s.redis.ca_file = ca_file.to_owned();
    s
}

#[tokio::test]
async fn redis_over_tls_checks_the_certificate_against_the_ca_given() {
    crate::shared_backend_only!();
    let certs = Certificates::make();
    let redis = TlsRedis::start(&certs).await;

    let printed = serve_fails(&on_redis(&redis, &certs.wrong_ca()));
    assert!(printed.contains("TLS with Redis failed"), "{printed}");
    assert!(printed.contains("redis.ca_file"), "{printed}");

    // The right CA: revocations go through Redis, over TLS. A logout is refused at
    // once, and the login failure budget (also in Redis) answers.
    let app = spawn_app_with(on_redis(&redis, &certs.ca())).await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    assert_eq!(app.me(&tokens.access).await.status(), StatusCode::OK);
    assert_eq!(
        app.logout(&tokens.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.me(&tokens.access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.login(&email, "wrong password").await.status(),
        StatusCode::UNAUTHORIZED
    );
    ready_then_stop(app).await;

    // A CA file with a redis:// URL is a mistake the server names.
    let mut plain = on_redis(&redis, &certs.ca());
    plain.redis.url = SecretString::from(format!("redis://127.0.0.1:{}", redis.port));
    let printed = serve_fails(&plain);
    assert!(printed.contains("not rediss://"), "{printed}");
}
