//! `spawn_app()`: the real application on port 0 with its own database, Redis key
//! prefix and keys directory, plus typed helpers for the contract's endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use tessera::config::Settings;
use tessera::startup::{AppState, Application};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery";

/// Taken by the tests that load the machine for long (a browser) and by those that
/// measure time (a side channel's ratio of medians), so that neither runs beside the
/// other: one browser at a time, and no browser while a timing test measures.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A TCP port free on loopback right now (for a child process to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Base URL of the test Postgres server (no database name).
pub fn postgres_base() -> String {
    std::env::var("TESSERA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into())
}

/// Whether this run tests the embedded configuration (`TESSERA_TEST_BACKEND=embedded`,
/// the second run of `scripts/test.sh`) rather than PostgreSQL + Redis: SQLite, with
/// revocation marks and failure budgets in process.
pub fn embedded() -> bool {
    std::env::var("TESSERA_TEST_BACKEND").is_ok_and(|b| b == "embedded")
}

/// Ends a test that is about PostgreSQL or Redis themselves (their outages, row locks,
/// statement timeouts, migration history) or about several instances sharing them,
/// when this run tests the embedded configuration (where none of it applies).
#[macro_export]
macro_rules! shared_backend_only {
    () => {
        if $crate::helpers::embedded() {
            eprintln!("{}: not part of the embedded run", module_path!());
            return;
        }
    };
}

pub fn redis_url() -> String {
    std::env::var("TESSERA_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub state: actix_web::web::Data<AppState>,
    server: actix_web::dev::ServerHandle,
    /// The metrics listener's port (with `metrics.listen` set).
    pub metrics_port: Option<u16>,
}

/// Settings for one test: fresh database, prefix and keys dir; cheap argon2 (the
/// production defaults are tested on their own); generous login limits.
pub fn test_settings() -> Settings {
    let mut s = Settings::load_from(None, Vec::new()).expect("defaults load");
    // scripts/test.sh names its run, so that it removes only its own databases.
    let run = std::env::var("TESSERA_TEST_RUN").unwrap_or_else(|_| "r0".into());
    let id = format!("{run}_{}", Uuid::new_v4().simple());
    s.server.port = 0;
    s.server.workers = 2;
    s.database.url = match embedded() {
        true => format!("sqlite://{}/tessera.db", test_data_dir(&id).display()),
        false => format!("{}/tessera_test_{id}", postgres_base()),
    }
    .into();
    s.database.max_connections = 8;
    s.redis.url = match embedded() {
        true => String::new().into(),
        false => redis_url().into(),
    };
    s.redis.key_prefix = format!("tessera_test:{id}:");
    s.keys.dir = std::env::temp_dir().join(format!("tessera-test-keys-{id}"));
    // Tests that look at metrics turn them on, on a free port.
    s.metrics.listen = String::new();
    s.password.memory_kib = 256;
    s.password.iterations = 1;
    s.password.allow_weak = true;
    s.password.workers = 2;
    s.login.per_ip_per_minute = 10_000;
    s.login.per_account_per_minute = 10_000;
    s.login.free_failures = 10_000;
    s.log.level = "warn".into();
    s
}

/// Where a test's SQLite database lives (scripts/test-databases.sh removes it).
pub fn test_data_dir(id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tessera-test-data-{id}"))
}

/// [`test_settings`] with a real per-account failure budget: `free` free failures, then
/// delays from `base` up to `max` seconds.
pub fn with_failure_budget(free: u32, base: u64, max: u64) -> Settings {
    let mut s = test_settings();
    s.login.free_failures = free;
    s.login.delay_base_secs = base;
    s.login.delay_max_secs = max;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings()).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let app = Application::build(settings.clone())
        .await
        .expect("application builds");
    serve(app, settings)
}

/// Runs a built application in the background, as a [`TestApp`].
pub fn serve(app: Application, settings: Settings) -> TestApp {
    let base = format!("http://127.0.0.1:{}", app.port());
    let metrics_port = app.metrics_port();
    let state = app.state();
    let server = app.handle();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        base,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        settings,
        state,
        server,
        metrics_port,
    }
}

impl TestApp {
    /// Stops the server and lets go of everything it held (its database connections
    /// too), as a process exit would.
    pub async fn stop(self) {
        self.server.stop(true).await;
    }
}

/// Tokens from a successful login or refresh.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub access: String,
    pub refresh: String,
    pub session_id: String,
    pub body: Value,
}

impl Tokens {
    pub fn from_body(body: Value) -> Self {
        Tokens {
            access: body["access_token"]
                .as_str()
                .expect("access_token")
                .to_owned(),
            refresh: body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .to_owned(),
            session_id: body["session_id"].as_str().expect("session_id").to_owned(),
            body,
        }
    }

    /// The access token's claims, read without checking the signature.
    pub fn claims(&self) -> Value {
        use base64::Engine;
        let payload = self.access.split('.').nth(1).expect("a JWT");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64url claims");
        serde_json::from_slice(&bytes).expect("JSON claims")
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Response {
        self.client
            .post(self.url(path))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    pub async fn register(&self, email: &str, password: &str) -> Response {
        self.post_json("/users", &json!({"email": email, "password": password}))
            .await
    }

    /// A fresh user with [`PASSWORD`]; returns the email.
    pub async fn new_user(&self) -> String {
        let email = format!("user-{}@example.com", Uuid::new_v4().simple());
        let res = self.register(&email, PASSWORD).await;
        assert_eq!(
            res.status(),
            StatusCode::CREATED,
            "{}",
            res.text().await.unwrap()
        );
        email
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json("/login", &json!({"email": email, "password": password}))
            .await
    }

    pub async fn login_ok(&self, email: &str) -> Tokens {
        self.login_ok_with(email, PASSWORD).await
    }

    pub async fn login_ok_with(&self, email: &str, password: &str) -> Tokens {
        let res = self.login(email, password).await;
        assert_eq!(res.status(), StatusCode::OK);
        Tokens::from_body(res.json().await.unwrap())
    }

    pub async fn refresh(&self, refresh_token: &str) -> Response {
        self.post_json("/refresh", &json!({"refresh_token": refresh_token}))
            .await
    }

    pub async fn refresh_ok(&self, refresh_token: &str) -> Tokens {
        let res = self.refresh(refresh_token).await;
        assert_eq!(res.status(), StatusCode::OK);
        Tokens::from_body(res.json().await.unwrap())
    }

    pub async fn me(&self, access_token: &str) -> Response {
        self.client
            .get(self.url("/me"))
            .bearer_auth(access_token)
            .send()
            .await
            .unwrap()
    }

    pub async fn logout(&self, access_token: &str, scope: Option<&str>) -> Response {
        let req = self
            .client
            .post(self.url("/logout"))
            .bearer_auth(access_token);
        let req = match scope {
            Some(scope) => req.json(&json!({"scope": scope})),
            None => req,
        };
        req.send().await.unwrap()
    }

    /// `method path` with a bearer token and an optional JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Response {
        let req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        let req = match body {
            Some(body) => req.json(body),
            None => req,
        };
        req.send().await.unwrap()
    }

    pub async fn sessions(&self, token: &str) -> Vec<Value> {
        let res = self
            .call(reqwest::Method::GET, "/sessions", token, None)
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    pub async fn change_password(&self, token: &str, current: &str, new: &str) -> Response {
        let body = json!({"current_password": current, "new_password": new});
        self.call(reqwest::Method::PUT, "/me/password", token, Some(&body))
            .await
    }

    /// Gives `email` the roles `user` and `admin` directly in the database (the CLI way
    /// is tested on its own) and logs in.
    pub async fn admin(&self) -> Tokens {
        let email = self.new_user().await;
        self.make_admin(&email).await;
        self.login_ok(&email).await
    }

    /// Gives the user `email` the roles `user` and `admin` in the database (a role change
    /// made there revokes nothing: the next refresh carries the roles).
    pub async fn make_admin(&self, email: &str) {
        let mut db = self.db().await;
        sqlx::query(self.pick(
            "UPDATE users SET roles = '{user,admin}' WHERE email = $1",
            r#"UPDATE users SET roles = '["user","admin"]' WHERE email = $1"#,
        ))
        .bind(email)
        .execute(&mut db)
        .await
        .unwrap();
    }

    /// The id of the user `email`.
    pub async fn user_id(&self, email: &str) -> Uuid {
        let mut db = self.db().await;
        let id: String = sqlx::query_scalar("SELECT CAST(id AS TEXT) FROM users WHERE email = $1")
            .bind(email)
            .fetch_one(&mut db)
            .await
            .unwrap();
        id.parse().unwrap()
    }

    /// Clears the shared per-account login failure count of `email` (as a success does).
    pub async fn forget_login_failures(&self, email: &str) {
        let account = tessera::domain::Email::parse(email).unwrap().normalized();
        self.state
            .auth
            .failures
            .reset(tessera::store::Budget::Account, &account)
            .await
            .unwrap();
    }

    /// The kinds of the audit rows, oldest first.
    pub async fn audit_kinds(&self) -> Vec<String> {
        let mut db = self.db().await;
        sqlx::query_scalar("SELECT kind FROM audit_events ORDER BY id")
            .fetch_all(&mut db)
            .await
            .unwrap()
    }

    pub async fn jwks(&self) -> Value {
        let res = self
            .client
            .get(self.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A direct connection to this test's database (PostgreSQL or SQLite), to inspect
    /// or age rows. sqlx's `Any` driver: text, integers, floats, bytes and booleans.
    /// Portable SQL runs as it is (both accept `$1` and `CAST(id AS TEXT)`); where the
    /// two differ (times, arrays), [`TestApp::pick`] chooses the backend's own statement.
    pub async fn db(&self) -> sqlx::AnyConnection {
        connect_db(&self.settings).await
    }

    /// Whether this test's database is SQLite.
    pub fn sqlite(&self) -> bool {
        use secrecy::ExposeSecret;
        self.settings
            .database
            .url
            .expose_secret()
            .starts_with("sqlite:")
    }

    /// The statement for this test's backend: PostgreSQL's, or SQLite's (times there
    /// are INTEGER microseconds since the epoch, ids TEXT, roles a JSON array).
    pub fn pick(&self, postgres: &'static str, sqlite: &'static str) -> &'static str {
        if self.sqlite() { sqlite } else { postgres }
    }
}

/// A direct connection to the database of `settings` (see [`TestApp::db`]).
pub async fn connect_db(settings: &Settings) -> sqlx::AnyConnection {
    use secrecy::ExposeSecret;
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(settings.database.url.expose_secret())
        .await
        .unwrap()
}

/// Asserts that every response is a 200 token response carrying the same refresh
/// token (no forked chain); returns each response's tokens.
pub async fn assert_one_successor(responses: Vec<Response>) -> Vec<Tokens> {
    let mut successors = Vec::new();
    for res in responses {
        assert_eq!(res.status(), StatusCode::OK);
        successors.push(Tokens::from_body(res.json().await.unwrap()));
    }
    let first = &successors[0].refresh;
    assert!(
        successors.iter().all(|t| &t.refresh == first),
        "forked chain"
    );
    successors
}

/// Asserts the contract's error shape and code; returns the body.
pub async fn assert_error(res: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status, "unexpected status");
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        content_type
            .unwrap_or_default()
            .starts_with("application/json")
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], code, "body: {body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "body: {body}"
    );
    body
}

pub async fn assert_unavailable(res: Response) {
    assert_eq!(
        res.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("1")
    );
    assert_error(
        res,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
    )
    .await;
}

pub async fn assert_invalid_grant(res: Response, reason: &str) {
    let body = assert_error(res, StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(body["error_reason"], reason, "body: {body}");
}

pub async fn assert_invalid_token(res: Response) {
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_token").await;
}

/// A TCP proxy in front of Postgres or Redis that a test can cut and restore, to see
/// the server answer 503 while a backing service is down and recover when it is back.
/// It can also drop only the connections that send a given command (e.g. Redis SETEX),
/// to fail the second half of an operation whose first half succeeded.
pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    poison: Arc<Mutex<Option<Vec<u8>>>>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    /// Milliseconds every reply waits before it is passed on (order kept).
    delay_ms: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let poison = Arc::new(Mutex::new(None::<Vec<u8>>));
        let conns = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (d, f, p, c) = (down.clone(), frozen.clone(), poison.clone(), conns.clone());
        let delay = delay_ms.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let poison = p.clone();
                let delay = delay.clone();
                let (frozen_up, frozen_down) = (f.clone(), f.clone());
                let task = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            let poisoned = poison.lock().unwrap().as_ref().is_some_and(|needle| {
                                buf[..n]
                                    .windows(needle.len())
                                    .any(|w| w == needle.as_slice())
                            });
                            if frozen_up.load(Ordering::SeqCst) {
                                continue; // swallowed: the connection stays open, silent
                            }
                            if poisoned || to_server.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Replies are read as they come and written out `delay` after
                    // each was read (so a delay does not pile up).
                    let (due_tx, mut due_rx) =
                        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_server.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            if frozen_down.load(Ordering::SeqCst) {
                                continue;
                            }
                            let wait =
                                std::time::Duration::from_millis(delay.load(Ordering::SeqCst));
                            let due = tokio::time::Instant::now() + wait;
                            if due_tx.send((due, buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    };
                    let writer = async {
                        while let Some((due, bytes)) = due_rx.recv().await {
                            tokio::time::sleep_until(due).await;
                            if to_client.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        _ = downstream => {}
                        _ = writer => {}
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            down,
            frozen,
            poison,
            conns,
            delay_ms,
        }
    }

    /// Holds every reply from now on for `delay` before passing it on, in order, as a
    /// slow or congested link does (until `restore`).
    pub fn delay_replies(&self, delay: std::time::Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stops forwarding in both directions without closing anything, as a network that
    /// silently drops a connection does (until `restore`).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
        self.delay_ms.store(0, Ordering::SeqCst);
        *self.poison.lock().unwrap() = None;
    }

    /// Drops any connection that sends `needle` (until `restore`).
    pub fn drop_connections_sending(&self, needle: &[u8]) {
        *self.poison.lock().unwrap() = Some(needle.to_vec());
    }
}

/// Polls `check` until it is true or ten seconds pass.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn keys_dir(app: &TestApp) -> PathBuf {
    app.settings.keys.dir.clone()
}

/// A `redis-server` of the test's own on a free loopback port (for settings the
/// machine's Redis must not be given), stopped on drop.
pub struct OwnRedis {
    pub url: String,
    child: std::process::Child,
}

impl OwnRedis {
    pub async fn start(extra: &[&str]) -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/services.sh installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        eventually("the test's own Redis answers", || async {
            client.get_multiplexed_async_connection().await.is_ok()
        })
        .await;
        OwnRedis { url, child }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `tessera serve` binary for `settings`' database, Redis prefix and keys, on
/// port 0, logging JSON to a fresh file (returned; remove it when done). Add more
/// `TESSERA__*` variables before spawning.
pub fn server_binary(settings: &Settings) -> (std::process::Command, PathBuf) {
    use secrecy::ExposeSecret;
    let log_path = std::env::temp_dir().join(format!("tessera-log-{}.json", Uuid::new_v4()));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.env_remove("RUST_LOG")
        .env("TESSERA__SERVER__PORT", "0")
        .env(
            "TESSERA__DATABASE__URL",
            settings.database.url.expose_secret(),
        )
        .env("TESSERA__REDIS__URL", settings.redis.url.expose_secret())
        .env("TESSERA__REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env("TESSERA__KEYS__DIR", &settings.keys.dir)
        .env("TESSERA__LOG__FORMAT", "json")
        .env("TESSERA__METRICS__LISTEN", &settings.metrics.listen)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log_file));
    (cmd, log_path)
}

/// The base URL a server started with [`server_binary`] logs that it listens on.
pub async fn listening_at(log_path: &std::path::Path) -> String {
    let mut address = None;
    eventually("the server logs its address", || {
        address = json_log(log_path)
            .into_iter()
            .find(|l| l["message"] == "tessera listening")
            .and_then(|l| l["address"].as_str().map(String::from));
        std::future::ready(address.is_some())
    })
    .await;
    format!("http://{}", address.unwrap())
}

/// The JSON lines of a log written by [`server_binary`] so far.
pub fn json_log(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Stops `app` and starts a new instance on `settings` (usually the same database) once
/// the old one has let go of it: a restart. An instance without Redis holds a
/// single-instance claim that PostgreSQL releases when its connection closes.
pub async fn restart(app: TestApp, settings: &Settings) -> TestApp {
    app.stop().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Application::build(settings.clone()).await {
            Ok(app) => return serve(app, settings.clone()),
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(
                    format!("{e:#}").contains("another Tessera instance"),
                    "{e:#}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the previous instance never let go: {e:#}"),
        }
    }
}
