//! The demo SPA (`examples/spa/`, with `clients/js/`) in a real browser: headless
//! Chromium from the distribution, driven over WebDriver (`chromedriver`, the W3C
//! protocol spoken with reqwest). Tessera runs on `localhost`, the demo on another
//! port of `localhost` (another origin, the same site), and a hostile page on
//! `127.0.0.1` (another site).
//!
//! scripts/test.sh installs `chromium`, `chromium-driver` and `nodejs` and sets
//! `TESSERA_TEST_BROWSER=required`, so a missing browser fails there; a bare
//! `cargo test` without them says so and skips. The tests take turns (one browser at a
//! time), since they measure how tabs behave over several token lifetimes.
//!
//! `TESSERA_UPDATE_SCREENSHOT=1 scripts/test.sh browser::` rewrites `docs/spa.png`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera::config::Settings;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the browser tests can run here; panics where they must.
fn browser_available() -> bool {
    let missing: Vec<&str> = [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")]
        .into_iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| package)
        .chain((!have("node")).then_some("nodejs"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "the browser tests need the Debian packages {} (scripts/test.sh installs them)",
        missing.join(", ")
    );
    if std::env::var("TESSERA_TEST_BROWSER").is_ok_and(|v| v == "required") {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// A WebDriver session on headless Chromium.
struct Browser {
    http: reqwest::Client,
    session: String,
    _driver: Child,
    profile: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(res) = ready
                && let Ok(body) = res.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver never got ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!(
            "tessera-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1200,860", "--hide-scrollbars", "--no-first-run",
                    format!("--user-data-dir={}", profile.display()),
                    // Tabs in the background keep their timers running on time, as a
                    // visible tab's do, so that expiries are measured, not throttling.
                    "--disable-background-timer-throttling",
                    "--disable-renderer-backgrounding",
                    "--disable-backgrounding-occluded-windows",
                ],
            },
        }}});
        let res: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {res}"))
            .to_owned();
        let browser = Browser {
            http,
            session: format!("{base}/session/{session}"),
            _driver: driver,
            profile,
        };
        browser
            .cmd(
                "POST",
                "/timeouts",
                json!({"script": 30_000, "pageLoad": 30_000}),
            )
            .await;
        browser
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let res: Value = req.send().await.unwrap().json().await.unwrap();
        if let Some(error) = res["value"]["error"].as_str() {
            panic!(
                "WebDriver {method} {path}: {error}: {}",
                res["value"]["message"]
            );
        }
        res["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url})).await;
    }

    async fn reload(&self) {
        self.cmd("POST", "/refresh", json!({})).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Waits until the expression `condition` is truthy in the page.
    async fn wait(&self, what: &str, condition: &str, within: Duration) {
        let started = Instant::now();
        loop {
            let script = format!("try {{ return !!({condition}); }} catch (e) {{ return false; }}");
            if self.js(&script, json!([])).await == true {
                return;
            }
            if started.elapsed() > within {
                let state = self.js("return document.body.innerText", json!([])).await;
                panic!("{what}: not within {within:?}; the page shows:\n{state}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn new_tab(&self) -> String {
        let tab = self
            .cmd("POST", "/window/new", json!({"type": "tab"}))
            .await;
        tab["handle"].as_str().unwrap().to_owned()
    }

    async fn tab(&self) -> String {
        self.cmd("GET", "/window", json!({}))
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn switch(&self, handle: &str) {
        self.cmd("POST", "/window", json!({"handle": handle})).await;
    }

    /// Every cookie the browser holds for the current page's host, HttpOnly ones too.
    async fn cookies(&self) -> Vec<Value> {
        self.cmd("GET", "/cookie", json!({}))
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn screenshot(&self) -> Vec<u8> {
        let png = self.cmd("GET", "/screenshot", json!({})).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    /// Ends the WebDriver session, which closes Chromium, also when a test fails half-way
    /// (killing chromedriver alone would leave the browser running). Plain blocking HTTP:
    /// no runtime is needed in a destructor.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Some(rest) = self.session.strip_prefix("http://") else {
            return;
        };
        let Some((host, path)) = rest.split_once('/') else {
            return;
        };
        if let Ok(mut stream) = std::net::TcpStream::connect(host) {
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let request = format!(
                "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).ok();
            }
        }
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

/// Tessera, the demo's static server and a browser.
struct Demo {
    app: TestApp,
    /// The demo page, with Tessera's URL in its query.
    page: String,
    /// Tessera as the page calls it.
    tessera: String,
    /// The hostile page, on another site.
    probe: String,
    browser: Browser,
    _spa: Child,
}

async fn demo(configure: impl FnOnce(&mut Settings)) -> Option<Demo> {
    if !browser_available() {
        return None;
    }
    // The static server first: Tessera must know the demo's origin.
    let mut spa = Command::new("node")
        .arg(repo().join("examples/spa/serve.mjs"))
        .args(["--port", "0", "--extra"])
        .arg(repo().join("tests/browser"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts the demo's server");
    let mut line = String::new();
    BufReader::new(spa.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let spa_origin = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("serve.mjs said {line:?}"))
        .to_owned();
    let spa_port = spa_origin.rsplit(':').next().unwrap().to_owned();

    let mut settings = test_settings();
    settings.server.cors_allowed_origins = vec![spa_origin.clone()];
    configure(&mut settings);
    let app = spawn_app_with(settings).await;
    let tessera = app.base.replace("127.0.0.1", "localhost");
    let page = format!("{spa_origin}/?tessera={tessera}");
    let probe = format!("http://127.0.0.1:{spa_port}/extra/probe.html?tessera={tessera}");
    let browser = Browser::start().await;
    Some(Demo {
        app,
        page,
        tessera,
        probe,
        browser,
        _spa: spa,
    })
}

impl Demo {
    /// Signs in through the demo's form and waits for the signed-in page.
    async fn sign_in(&self, email: &str, remember: bool) {
        let b = &self.browser;
        b.go(&self.page).await;
        b.wait(
            "the sign-in form",
            "document.body.dataset.state === 'login-view'",
            secs(10),
        )
        .await;
        b.js(
            "document.getElementById('email').value = arguments[0];
             document.getElementById('password').value = arguments[1];
             document.getElementById('remember').checked = arguments[2];
             document.getElementById('login-submit').click();",
            json!([email, PASSWORD, remember]),
        )
        .await;
        self.wait_signed_in(email).await;
    }

    async fn wait_signed_in(&self, email: &str) {
        self.browser
            .wait(
                "the signed-in page",
                &format!(
                    "document.body.dataset.state === 'app-view' && \
                     document.getElementById('me-email').textContent === {email:?} && \
                     document.querySelectorAll('#sessions tr').length > 0"
                ),
                secs(10),
            )
            .await;
    }

    /// The browser's refresh cookie (WebDriver sees HttpOnly cookies; scripts do not).
    async fn refresh_cookie(&self) -> Option<String> {
        self.browser
            .cookies()
            .await
            .into_iter()
            .find(|c| c["name"] == "__Host-tessera_refresh")
            .map(|c| c["value"].as_str().unwrap().to_owned())
    }

    /// The user's audit events of `kind`, oldest first.
    async fn audit(&self, admin: &Tokens, user: uuid::Uuid, kind: &str) -> Vec<Value> {
        let res = self
            .app
            .call(
                reqwest::Method::GET,
                &format!("/admin/audit?user_id={user}&limit=1000"),
                &admin.access,
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        let events: Vec<Value> = res.json().await.unwrap();
        let mut of_kind: Vec<Value> = events.into_iter().filter(|e| e["kind"] == kind).collect();
        of_kind.reverse();
        of_kind
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[tokio::test]
async fn signing_in_survives_a_reload_and_no_script_can_reach_the_refresh_token() {
    let _turn = HEAVY.lock().await;
    let Some(d) = demo(|_| {}).await else { return };
    // A readable name for the screenshot below (every test has its own database).
    let email = "ada.lovelace@example.com";
    let res = d.app.register(email, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    d.sign_in(email, true).await;
    let b = &d.browser;

    let refresh = d
        .refresh_cookie()
        .await
        .expect("the browser holds the refresh cookie");
    assert!(refresh.len() >= 43);
    let cookie = b.cookies().await;
    let held = cookie
        .iter()
        .find(|c| c["name"] == "__Host-tessera_refresh")
        .unwrap();
    assert_eq!(held["httpOnly"], true);
    assert_eq!(held["secure"], true);
    assert_eq!(held["sameSite"], "Strict");

    let readable = "return [document.cookie, JSON.stringify(Object.entries(localStorage)), \
                    JSON.stringify(Object.entries(sessionStorage))]";
    let seen = b.js(readable, json!([])).await;
    for (place, text) in ["document.cookie", "localStorage", "sessionStorage"]
        .iter()
        .zip(seen.as_array().unwrap())
    {
        assert!(
            !text.as_str().unwrap().contains(&refresh),
            "{place} holds the refresh token: {text}"
        );
    }

    // A reload keeps the user signed in (through the cookie), with a new access token.
    let before = b.js("return window.tessera.accessToken", json!([])).await;
    b.reload().await;
    d.wait_signed_in(email).await;
    let after = b.js("return window.tessera.accessToken", json!([])).await;
    assert!(after.is_string() && after != before);
    let seen = b.js(readable, json!([])).await;
    let rotated = d.refresh_cookie().await.unwrap();
    assert_ne!(rotated, refresh, "the reload's refresh rotated the cookie");
    for text in seen.as_array().unwrap() {
        assert!(!text.as_str().unwrap().contains(&rotated));
    }

    // The picture of the signed-in demo in the README.
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"));
    let out = repo().join("target/spa.png");
    std::fs::write(&out, &png).unwrap();
    if std::env::var("TESSERA_UPDATE_SCREENSHOT").is_ok() {
        std::fs::write(repo().join("docs/spa.png"), &png).unwrap();
    }
}

#[tokio::test]
async fn two_tabs_over_several_expiries_cause_one_refresh_each_and_stay_signed_in() {
    const TTL: u64 = 3;
    let _turn = HEAVY.lock().await;
    let Some(d) = demo(|s| s.tokens.access_ttl_secs = TTL).await else {
        return;
    };
    let email = d.app.new_user().await;
    let admin = d.app.admin().await;
    let user = d.app.user_id(&email).await;
    d.sign_in(&email, true).await;
    let b = &d.browser;
    let first = b.tab().await;
    let second = b.new_tab().await;
    b.switch(&second).await;
    b.go(&d.page).await;
    d.wait_signed_in(&email).await;

    // Both tabs call the API every 300 ms, across about four token lifetimes.
    let calls = "window.__calls = []; window.__loop = setInterval(() =>
        window.tessera.fetch(arguments[0] + '/me').then(r => window.__calls.push(r.status),
                                                          e => window.__calls.push(String(e))),
        300);";
    let started = d.audit(&admin, user, "refresh").await.len();
    for tab in [&first, &second] {
        b.switch(tab).await;
        b.js(calls, json!([d.tessera])).await;
    }
    tokio::time::sleep(Duration::from_secs(4 * TTL)).await;

    let mut counted = 0;
    for tab in [&first, &second] {
        b.switch(tab).await;
        let calls = b
            .js(
                "clearInterval(window.__loop); return window.__calls",
                json!([]),
            )
            .await;
        let calls = calls.as_array().unwrap();
        assert!(calls.len() >= 20, "{calls:?}");
        assert!(calls.iter().all(|c| c == 200), "a call failed: {calls:?}");
        assert_eq!(
            b.js("return window.tessera.loggedIn", json!([])).await,
            true
        );
        counted += calls.len();
    }
    let refreshes = d.audit(&admin, user, "refresh").await;
    let during: Vec<chrono::DateTime<chrono::Utc>> = refreshes[started..]
        .iter()
        .map(|e| e["occurred_at"].as_str().unwrap().parse().unwrap())
        .collect();
    // The client refreshes two thirds into each lifetime: about every 2 s here, so
    // about six refreshes in 12 s. Two tabs refreshing for the same expiry would show
    // as two refreshes milliseconds apart.
    assert!(
        (4..=8).contains(&during.len()),
        "{} refreshes in {} s",
        during.len(),
        4 * TTL
    );
    for pair in during.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap > chrono::Duration::milliseconds(1000),
            "two refreshes for one expiry, {gap} apart: {during:?}"
        );
    }
    assert!(
        d.audit(&admin, user, "refresh_reuse_detected")
            .await
            .is_empty()
    );
    eprintln!("{counted} calls, {} refreshes", during.len());
}

#[tokio::test]
async fn logging_out_in_one_tab_logs_the_other_out_within_a_second() {
    let _turn = HEAVY.lock().await;
    let Some(d) = demo(|_| {}).await else { return };
    let email = d.app.new_user().await;
    d.sign_in(&email, false).await;
    let b = &d.browser;
    let first = b.tab().await;
    let second = b.new_tab().await;
    b.switch(&second).await;
    b.go(&d.page).await;
    d.wait_signed_in(&email).await;
    let cookie = d.refresh_cookie().await.unwrap();
    let csrf = b
        .js("return localStorage.getItem('tessera.csrf')", json!([]))
        .await;

    b.switch(&first).await;
    b.js("document.getElementById('logout-here').click()", json!([]))
        .await;
    b.wait(
        "the first tab signed out",
        "document.body.dataset.state === 'login-view'",
        secs(5),
    )
    .await;
    b.switch(&second).await;
    b.wait(
        "the second tab signed out",
        "document.body.dataset.state === 'login-view' && \
         document.getElementById('expired-text').textContent.includes('another tab')",
        secs(1),
    )
    .await;
    assert_eq!(d.refresh_cookie().await, None, "the cookies were cleared");
    // The cookie the tabs shared no longer refreshes, even when sent by hand.
    let res = d
        .app
        .client
        .post(d.app.url("/refresh"))
        .header("cookie", format!("__Host-tessera_refresh={cookie}"))
        .header("origin", d.page.split("/?").next().unwrap())
        .header("x-csrf-token", csrf.as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_invalid_grant(res, "revoked").await;
}

#[tokio::test]
async fn a_page_on_another_site_cannot_refresh_or_end_the_session() {
    let _turn = HEAVY.lock().await;
    let Some(d) = demo(|_| {}).await else { return };
    let email = d.app.new_user().await;
    let admin = d.app.admin().await;
    let user = d.app.user_id(&email).await;
    d.sign_in(&email, true).await;
    let b = &d.browser;
    let home = b.tab().await;
    let cookie = d.refresh_cookie().await.unwrap();

    let other = b.new_tab().await;
    b.switch(&other).await;
    b.go(&d.probe).await;
    b.wait(
        "the other site's attempts",
        "window.done === true",
        secs(15),
    )
    .await;
    let results = b.js("return window.results", json!([])).await;
    eprintln!("the other site's attempts: {results}");
    assert_eq!(results.as_object().unwrap().len(), 5, "{results}");

    // Nothing happened to the session: no logout or refresh was counted, the cookie is
    // still the current token, and the demo goes on.
    assert!(d.audit(&admin, user, "logout").await.is_empty());
    let refreshes = d.audit(&admin, user, "refresh").await.len();
    b.switch(&home).await;
    assert_eq!(d.refresh_cookie().await.as_deref(), Some(cookie.as_str()));
    let status = b
        .cmd(
            "POST",
            "/execute/async",
            json!({"script": "const done = arguments[arguments.length - 1];
                    window.tessera.refresh()
                      .then(() => window.tessera.fetch(arguments[0] + '/me'))
                      .then(r => done(r.status), e => done(String(e)));",
                   "args": [d.tessera]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(d.audit(&admin, user, "refresh").await.len(), refreshes + 1);
    assert!(
        d.audit(&admin, user, "refresh_reuse_detected")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_short_session_warns_before_it_ends_and_then_asks_to_sign_in_again() {
    let _turn = HEAVY.lock().await;
    let Some(d) = demo(|s| {
        s.tokens.access_ttl_secs = 3;
        s.tokens.refresh_short_absolute_ttl_secs = 8;
    })
    .await
    else {
        return;
    };
    let email = d.app.new_user().await;
    // Without "keep me signed in": the session's absolute end is 8 s away, under the
    // demo's one-minute warning.
    d.sign_in(&email, false).await;
    let b = &d.browser;
    b.wait(
        "the expiry warning",
        "!document.getElementById('expiring').hidden && \
         /\\d+ seconds/.test(document.getElementById('expiring').textContent)",
        secs(3),
    )
    .await;
    b.wait(
        "the expired state",
        "document.body.dataset.state === 'login-view' && \
         !document.getElementById('expired').hidden && \
         document.getElementById('expired-text').textContent.includes('expired')",
        secs(15),
    )
    .await;
    assert_eq!(
        b.js(
            "return document.getElementById('expiring').hidden",
            json!([])
        )
        .await,
        true
    );
    assert_eq!(d.refresh_cookie().await, None, "the cookies were cleared");
}
