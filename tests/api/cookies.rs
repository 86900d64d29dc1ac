//! Browser sessions (`../shared/api.md` "Browser sessions (cookie delivery)"): the
//! refresh token in an HttpOnly cookie, the session-bound CSRF token and its two checks,
//! cookies cleared when a session ends, CORS with credentials. The tests play the
//! browser by hand (no cookie jar), so that every attribute is seen as sent.

use std::collections::HashMap;

use reqwest::header::{HeaderMap, SET_COOKIE};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tessera::config::Settings;

use crate::helpers::*;

const APP_ORIGIN: &str = "https://app.example.com";

fn browser_settings() -> Settings {
    let mut s = test_settings();
    s.server.cors_allowed_origins = vec![APP_ORIGIN.into()];
    s
}

/// One `Set-Cookie`: name, value and attributes (names lower-cased).
#[derive(Debug, Clone)]
struct SetCookie {
    name: String,
    value: String,
    attrs: HashMap<String, String>,
    raw: String,
}

impl SetCookie {
    fn parse(raw: &str) -> Self {
        let mut parts = raw.split(';').map(str::trim);
        let (name, value) = parts.next().unwrap().split_once('=').unwrap();
        let attrs = parts
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), v.to_owned()),
                None => (p.to_ascii_lowercase(), String::new()),
            })
            .collect();
        SetCookie {
            name: name.into(),
            value: value.into(),
            attrs,
            raw: raw.into(),
        }
    }

    fn has(&self, attr: &str) -> bool {
        self.attrs.contains_key(attr)
    }

    fn max_age(&self) -> Option<i64> {
        self.attrs.get("max-age").map(|v| v.parse().unwrap())
    }
}

fn set_cookies(headers: &HeaderMap) -> HashMap<String, SetCookie> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| SetCookie::parse(v.to_str().unwrap()))
        .map(|c| (c.name.clone(), c))
        .collect()
}

/// What a browser holds for Tessera's origin after a cookie login: the refresh cookie
/// (which its JavaScript cannot read), and the CSRF token (which it can).
#[derive(Debug, Clone)]
struct BrowserSession {
    refresh: String,
    csrf: String,
    device: Option<String>,
    access: String,
    session_id: String,
}

async fn cookie_login(app: &TestApp, email: &str, remember_me: bool) -> (BrowserSession, Response) {
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "remember_me": remember_me,
                    "token_delivery": "cookie"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let cookies = set_cookies(res.headers());
    let session = BrowserSession {
        refresh: cookies["__Host-tessera_refresh"].value.clone(),
        csrf: cookies["__Host-tessera_csrf"].value.clone(),
        device: cookies
            .get("__Host-tessera_device")
            .map(|c| c.value.clone()),
        access: String::new(),
        session_id: String::new(),
    };
    (session, res)
}

/// A cookie login, read into a [`BrowserSession`].
async fn browser_login(app: &TestApp, email: &str) -> BrowserSession {
    let (mut session, res) = cookie_login(app, email, true).await;
    let body: Value = res.json().await.unwrap();
    session.access = body["access_token"].as_str().unwrap().into();
    session.session_id = body["session_id"].as_str().unwrap().into();
    assert_eq!(body["csrf_token"], session.csrf.as_str());
    session
}

/// `POST path` as the browser sends it: the refresh cookie, and then the given Origin
/// and X-CSRF-Token (each left out when `None`).
async fn cookie_post(
    app: &TestApp,
    path: &str,
    refresh_cookie: &str,
    origin: Option<&str>,
    csrf: Option<&str>,
) -> Response {
    cookie_request(app, path, refresh_cookie, origin, csrf)
        .send()
        .await
        .unwrap()
}

fn cookie_request(
    app: &TestApp,
    path: &str,
    refresh_cookie: &str,
    origin: Option<&str>,
    csrf: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut req = app
        .client
        .post(app.url(path))
        .header("cookie", format!("__Host-tessera_refresh={refresh_cookie}"));
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    if let Some(csrf) = csrf {
        req = req.header("x-csrf-token", csrf);
    }
    req
}

/// A global logout through the browser's cookie.
async fn cookie_logout_everywhere(app: &TestApp, s: &BrowserSession) -> Response {
    cookie_request(app, "/logout", &s.refresh, Some(APP_ORIGIN), Some(&s.csrf))
        .json(&json!({"scope": "global"}))
        .send()
        .await
        .unwrap()
}

async fn cookie_refresh(app: &TestApp, s: &BrowserSession) -> Response {
    cookie_post(app, "/refresh", &s.refresh, Some(APP_ORIGIN), Some(&s.csrf)).await
}

/// A successful cookie refresh: the successor from its cookie, the rest from its body.
async fn cookie_refresh_ok(app: &TestApp, s: &BrowserSession) -> BrowserSession {
    let res = cookie_refresh(app, s).await;
    assert_eq!(res.status(), StatusCode::OK);
    let cookies = set_cookies(res.headers());
    let body: Value = res.json().await.unwrap();
    assert!(body.get("refresh_token").is_none(), "{body}");
    BrowserSession {
        refresh: cookies["__Host-tessera_refresh"].value.clone(),
        csrf: body["csrf_token"].as_str().unwrap().into(),
        device: s.device.clone(),
        access: body["access_token"].as_str().unwrap().into(),
        session_id: body["session_id"].as_str().unwrap().into(),
    }
}

/// Both cookies cleared: empty values with `Max-Age=0`, same names and attributes.
fn assert_cleared(headers: &HeaderMap) {
    let cookies = set_cookies(headers);
    for name in ["__Host-tessera_refresh", "__Host-tessera_csrf"] {
        let c = cookies
            .get(name)
            .unwrap_or_else(|| panic!("{name} not cleared"));
        assert_eq!(c.value, "", "{}", c.raw);
        assert_eq!(c.max_age(), Some(0), "{}", c.raw);
        assert_eq!(c.attrs.get("path").map(String::as_str), Some("/"));
    }
    assert!(
        !cookies.contains_key("__Host-tessera_device"),
        "ending a session does not forget the device"
    );
}

fn assert_not_cleared(headers: &HeaderMap) {
    assert!(
        set_cookies(headers).is_empty(),
        "no cookie may change here: {headers:?}"
    );
}

#[tokio::test]
async fn a_cookie_login_sets_exact_cookies_and_its_body_has_no_refresh_token() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = &app.settings;

    for remember_me in [true, false] {
        let (_, res) = cookie_login(&app, &email, remember_me).await;
        assert_eq!(res.headers()["cache-control"], "no-store");
        assert_eq!(res.headers()["pragma"], "no-cache");
        let cookies = set_cookies(res.headers());
        assert_eq!(cookies.len(), 3, "{cookies:?}");
        let refresh = &cookies["__Host-tessera_refresh"];
        let csrf = &cookies["__Host-tessera_csrf"];
        let device = &cookies["__Host-tessera_device"];
        for c in [refresh, csrf, device] {
            // The __Host- prefix: Secure, Path=/, no Domain.
            assert!(c.has("secure"), "{}", c.raw);
            assert_eq!(c.attrs["path"], "/", "{}", c.raw);
            assert!(!c.has("domain"), "{}", c.raw);
            assert_eq!(c.attrs["samesite"], "Strict", "{}", c.raw);
            assert!(c.value.len() >= 43, "{}", c.raw);
        }
        assert!(refresh.has("httponly") && device.has("httponly"));
        assert!(!csrf.has("httponly"), "the page must read the CSRF token");
        if remember_me {
            // The session's remaining absolute lifetime (a second or two may pass).
            let full = s.tokens.refresh_absolute_ttl_secs as i64;
            for c in [refresh, csrf] {
                let age = c.max_age().expect("a remembered session's cookie persists");
                assert!((full - 5..=full).contains(&age), "{}", c.raw);
            }
        } else {
            assert_eq!(refresh.max_age(), None, "a browser-session cookie");
            assert_eq!(csrf.max_age(), None, "a browser-session cookie");
        }
        assert_eq!(device.max_age(), Some(s.login.device_ttl_secs as i64));

        let body: Value = res.json().await.unwrap();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "access_token",
                "csrf_token",
                "expires_in",
                "refresh_token_expires_in",
                "session_id",
                "token_type"
            ]
        );
        assert_eq!(body["csrf_token"], csrf.value.as_str());
        assert_eq!(
            app.me(body["access_token"].as_str().unwrap())
                .await
                .status(),
            200
        );
    }

    // Body delivery stays exactly as it was: no cookies at all.
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "token_delivery": "body"}),
        )
        .await;
    assert_not_cleared(res.headers());
    let body: Value = res.json().await.unwrap();
    assert!(body["refresh_token"].is_string() && body["device_token"].is_string());
    assert!(body.get("csrf_token").is_none());
}

#[tokio::test]
async fn a_token_delivery_other_than_body_or_cookie_is_invalid_request() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    for delivery in [json!("Cookie"), json!("header"), json!(""), json!(1)] {
        let res = app
            .post_json(
                "/login",
                &json!({"email": email, "password": PASSWORD, "token_delivery": delivery}),
            )
            .await;
        assert_not_cleared(res.headers());
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}

#[tokio::test]
async fn a_cookie_refresh_rotates_into_a_new_cookie_and_keeps_the_sessions_csrf_token() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let first = browser_login(&app, &email).await;

    let res = cookie_refresh(&app, &first).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let cookies = set_cookies(res.headers());
    assert_eq!(
        cookies.len(),
        2,
        "refresh and CSRF cookies, no device cookie"
    );
    let refresh = &cookies["__Host-tessera_refresh"];
    assert_ne!(refresh.value, first.refresh, "rotated");
    assert!(refresh.has("httponly") && refresh.has("secure"));
    assert!(refresh.max_age().is_some(), "still a remembered session");
    assert_eq!(
        cookies["__Host-tessera_csrf"].value, first.csrf,
        "bound to the session"
    );

    let second = cookie_refresh_ok(&app, &first).await; // within the grace window
    assert_eq!(second.refresh, refresh.value, "the same successor");
    assert_eq!(second.session_id, first.session_id);
    let third = cookie_refresh_ok(&app, &second).await;
    assert_eq!(app.me(&third.access).await.status(), StatusCode::OK);

    // A cookie session is a session like any other: listed, and ended from the list.
    let other = app.login_ok(&email).await;
    let listed = app.sessions(&other.access).await;
    assert!(listed.iter().any(|s| s["id"] == first.session_id.as_str()));
    let res = app
        .call(
            Method::DELETE,
            &format!("/sessions/{}", first.session_id),
            &other.access,
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = cookie_refresh(&app, &third).await;
    assert_cleared(res.headers());
    assert_invalid_grant(res, "revoked").await;
    assert_invalid_token(app.me(&third.access).await).await;
}

#[tokio::test]
async fn a_browser_session_without_remember_me_keeps_browser_session_cookies_on_refresh() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let (mut s, res) = cookie_login(&app, &email, false).await;
    let body: Value = res.json().await.unwrap();
    s.csrf = body["csrf_token"].as_str().unwrap().into();
    let res = cookie_refresh(&app, &s).await;
    assert_eq!(res.status(), StatusCode::OK);
    let cookies = set_cookies(res.headers());
    assert_eq!(cookies["__Host-tessera_refresh"].max_age(), None);
    assert_eq!(cookies["__Host-tessera_csrf"].max_age(), None);
}

#[tokio::test]
async fn every_failed_csrf_check_is_403_access_denied_and_leaves_the_session_alive() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let other = browser_login(&app, &app.new_user().await).await;
    let ended = browser_login(&app, &email).await;
    let res = cookie_post(
        &app,
        "/logout",
        &ended.refresh,
        Some(APP_ORIGIN),
        Some(&ended.csrf),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let cases: [(&str, Option<&str>, Option<&str>); 7] = [
        ("no Origin", None, Some(&s.csrf)),
        (
            "another site's Origin",
            Some("https://evil.example"),
            Some(&s.csrf),
        ),
        (
            "a lookalike Origin",
            Some("https://app.example.com.evil.example"),
            Some(&s.csrf),
        ),
        ("an opaque Origin", Some("null"), Some(&s.csrf)),
        ("no X-CSRF-Token", Some(APP_ORIGIN), None),
        (
            "another session's token",
            Some(APP_ORIGIN),
            Some(&other.csrf),
        ),
        (
            "an ended session's token",
            Some(APP_ORIGIN),
            Some(&ended.csrf),
        ),
    ];
    for path in ["/refresh", "/logout"] {
        for (what, origin, csrf) in cases {
            let res = cookie_post(&app, path, &s.refresh, origin, csrf).await;
            assert_not_cleared(res.headers());
            let body = assert_error(res, StatusCode::FORBIDDEN, "access_denied").await;
            assert!(body.get("error_reason").is_none(), "{path}, {what}: {body}");
        }
    }
    // Nothing was rotated or ended: the cookie is still the current token.
    assert_eq!(app.me(&s.access).await.status(), StatusCode::OK);
    let next = cookie_refresh_ok(&app, &s).await;
    assert_ne!(next.refresh, s.refresh);
    assert!(
        !app.audit_kinds()
            .await
            .iter()
            .any(|k| k == "refresh_reuse_detected"),
        "the refused requests did not count as uses"
    );
}

#[tokio::test]
async fn the_issuers_origin_passes_the_origin_check_as_the_allowed_ones_do() {
    let mut settings = browser_settings();
    settings.tokens.issuer = "https://Auth.Example.com/tenant".into();
    let app = spawn_app_with(settings).await;
    let s = browser_login(&app, &app.new_user().await).await;
    let res = cookie_post(
        &app,
        "/refresh",
        &s.refresh,
        Some("https://auth.example.com"),
        Some(&s.csrf),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_body_token_wins_over_the_cookie() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let browser = browser_login(&app, &email).await;
    let mobile = app.login_ok(&email).await;
    let res = app
        .client
        .post(app.url("/refresh"))
        .header(
            "cookie",
            format!("__Host-tessera_refresh={}", browser.refresh),
        )
        .json(&json!({"refresh_token": mobile.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_not_cleared(res.headers());
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["session_id"], mobile.session_id.as_str());
    assert!(
        body["refresh_token"].is_string(),
        "answered as body delivery"
    );
    // The cookie's token was not used: it still rotates as the current one.
    let next = cookie_refresh_ok(&app, &browser).await;
    assert_eq!(next.session_id, browser.session_id);
}

#[tokio::test]
async fn concurrent_cookie_refreshes_from_several_tabs_get_one_successor() {
    let app = spawn_app_with(browser_settings()).await;
    let s = browser_login(&app, &app.new_user().await).await;
    let tabs = (0..6).map(|_| cookie_refresh(&app, &s));
    let answers = futures_util::future::join_all(tabs).await;
    let mut successors = Vec::new();
    for res in answers {
        assert_eq!(res.status(), StatusCode::OK);
        successors.push(
            set_cookies(res.headers())["__Host-tessera_refresh"]
                .value
                .clone(),
        );
    }
    assert!(
        successors.iter().all(|t| t == &successors[0]),
        "forked: {successors:?}"
    );
    assert!(
        !app.audit_kinds()
            .await
            .iter()
            .any(|k| k == "refresh_reuse_detected")
    );
}

#[tokio::test]
async fn reuse_through_cookies_ends_the_session_and_clears_the_cookies() {
    let mut settings = browser_settings();
    settings.tokens.refresh_reuse_grace_secs = 0;
    let app = spawn_app_with(settings).await;
    let first = browser_login(&app, &app.new_user().await).await;
    let second = cookie_refresh_ok(&app, &first).await;

    let res = cookie_refresh(&app, &first).await;
    assert_cleared(res.headers());
    assert_invalid_grant(res, "reused").await;
    // The whole session ended: its current cookie and its access token too.
    let res = cookie_refresh(&app, &second).await;
    assert_cleared(res.headers());
    assert_invalid_grant(res, "revoked").await;
    assert_invalid_token(app.me(&second.access).await).await;
}

#[tokio::test]
async fn an_unknown_refresh_cookie_is_invalid_grant_unknown_and_clears_nothing() {
    let app = spawn_app_with(browser_settings()).await;
    let s = browser_login(&app, &app.new_user().await).await;
    let mut forged = s.refresh.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for cookie in ["garbage", forged.as_str()] {
        let res = cookie_post(&app, "/refresh", cookie, Some(APP_ORIGIN), Some(&s.csrf)).await;
        assert_not_cleared(res.headers());
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert!(
            status == StatusCode::BAD_REQUEST && body["error_reason"] == "unknown"
                || status == StatusCode::FORBIDDEN && body["error"] == "access_denied",
            "{cookie}: {status} {body}"
        );
    }
    // No body and no cookie: the request names no token at all.
    let res = app.client.post(app.url("/refresh")).send().await.unwrap();
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    let res = app.post_json("/refresh", &json!({})).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn logout_through_the_cookie_ends_that_session_and_clears_both_cookies() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let elsewhere = app.login_ok(&email).await;

    let res = cookie_post(&app, "/logout", &s.refresh, Some(APP_ORIGIN), Some(&s.csrf)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_cleared(res.headers());
    assert_invalid_token(app.me(&s.access).await).await;
    let res = cookie_refresh(&app, &s).await;
    assert_invalid_grant(res, "revoked").await;
    assert_eq!(
        app.me(&elsewhere.access).await.status(),
        StatusCode::OK,
        "local only"
    );
    // A second logout with the same cookie changes nothing and still clears.
    let res = cookie_post(&app, "/logout", &s.refresh, Some(APP_ORIGIN), Some(&s.csrf)).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_cleared(res.headers());
    assert_eq!(app.me(&elsewhere.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn global_logout_through_the_cookie_ends_every_session_of_the_user() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let elsewhere = app.login_ok(&email).await;
    let res = cookie_logout_everywhere(&app, &s).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_cleared(res.headers());
    assert_invalid_token(app.me(&elsewhere.access).await).await;
    assert_invalid_grant(app.refresh(&elsewhere.refresh).await, "revoked").await;

    // A cookie of an ended session cannot end anyone else's sessions.
    let fresh = app.login_ok(&email).await;
    let res = cookie_logout_everywhere(&app, &s).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me(&fresh.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_bearer_logout_of_the_cookies_session_clears_the_cookies_too() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let other = browser_login(&app, &email).await;
    // A Bearer logout from a browser that also sends the refresh cookie of `s`.
    let logout = |access: String| {
        app.client
            .post(app.url("/logout"))
            .bearer_auth(access)
            .header("cookie", format!("__Host-tessera_refresh={}", s.refresh))
            .send()
    };
    // Bearer of another session, "local": the cookie's session lives on, cookies stay.
    let res = logout(other.access.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_not_cleared(res.headers());
    // Bearer of the cookie's own session: ended, so the cookies go.
    let res = logout(s.access.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_cleared(res.headers());
    // Neither a Bearer token nor a cookie: 401 as before.
    assert_invalid_token(app.client.post(app.url("/logout")).send().await.unwrap()).await;
}

#[tokio::test]
async fn with_cookies_secure_false_the_cookies_lose_secure_and_their_prefixes() {
    let mut settings = browser_settings();
    settings.cookies.secure = false;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "token_delivery": "cookie"}),
        )
        .await;
    let cookies = set_cookies(res.headers());
    let mut names: Vec<&str> = cookies.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["tessera_csrf", "tessera_device", "tessera_refresh"]);
    assert!(
        cookies
            .values()
            .all(|c| !c.has("secure") && c.attrs["samesite"] == "Strict")
    );
    assert!(cookies["tessera_refresh"].has("httponly"));
    // The unprefixed cookie works the same way.
    let res = app
        .client
        .post(app.url("/refresh"))
        .header(
            "cookie",
            format!("tessera_refresh={}", cookies["tessera_refresh"].value),
        )
        .header("origin", APP_ORIGIN)
        .header("x-csrf-token", &cookies["tessera_csrf"].value)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(set_cookies(res.headers()).contains_key("tessera_refresh"));
}

#[tokio::test]
async fn with_cookies_domain_the_csrf_cookie_is_set_on_that_domain_and_the_refresh_cookie_stays_host_only()
 {
    let mut settings = browser_settings();
    settings.cookies.domain = "example.com".into();
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "token_delivery": "cookie"}),
        )
        .await;
    let cookies = set_cookies(res.headers());
    let csrf = &cookies["__Secure-tessera_csrf"];
    assert_eq!(csrf.attrs["domain"], "example.com");
    assert!(csrf.has("secure") && !csrf.has("httponly"));
    let refresh = &cookies["__Host-tessera_refresh"];
    assert!(!refresh.has("domain"));
    assert!(!cookies.contains_key("__Host-tessera_csrf"));
}

#[tokio::test]
async fn cors_allows_credentials_and_the_csrf_header_for_allowed_origins_only() {
    let app = spawn_app_with(browser_settings()).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/refresh"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, x-csrf-token",
            )
            .send()
    };
    let res = preflight(APP_ORIGIN).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], APP_ORIGIN);
    assert_eq!(h["access-control-allow-credentials"], "true");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for header in ["content-type", "authorization", "x-csrf-token"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    assert!(h.contains_key("access-control-max-age"));

    let res = preflight("https://evil.example").await.unwrap();
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert!(
        !res.headers()
            .contains_key("access-control-allow-credentials")
    );

    // The actual request's answer names the origin, with credentials and Vary: Origin.
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let res = cookie_refresh(&app, &s).await;
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], APP_ORIGIN);
    assert_eq!(h["access-control-allow-credentials"], "true");
    let vary: Vec<String> = h
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_lowercase())
        .collect();
    assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
}

#[tokio::test]
async fn the_device_cookie_is_a_known_device_for_login_and_password_change() {
    let mut settings = with_failure_budget(2, 1, 4);
    settings.server.cors_allowed_origins = vec![APP_ORIGIN.into()];
    settings.login.per_account_per_minute = 10;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    let device = s
        .device
        .clone()
        .expect("a cookie login sets the device cookie");

    // A stranger puts the account into its delay ...
    for _ in 0..3 {
        app.login(&email, "wrong password").await;
    }
    let res = app.login(&email, PASSWORD).await;
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a new device waits"
    );
    // ... while the browser that holds the device cookie gets in, and keeps its device.
    let res = app
        .client
        .post(app.url("/login"))
        .header("cookie", format!("__Host-tessera_device={device}"))
        .json(&json!({"email": email, "password": PASSWORD, "token_delivery": "cookie"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        set_cookies(res.headers())["__Host-tessera_device"].value,
        device
    );

    // PUT /me/password too: held in the account's delay without the device cookie,
    // not with it.
    app.login(&email, "wrong password").await;
    let change = json!({"current_password": PASSWORD, "new_password": "a brand new password"});
    let res = app
        .call(Method::PUT, "/me/password", &s.access, Some(&change))
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let res = app
        .client
        .put(app.url("/me/password"))
        .bearer_auth(&s.access)
        .header("cookie", format!("__Host-tessera_device={device}"))
        .json(&json!({"current_password": PASSWORD, "new_password": "a brand new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn an_admin_ends_a_users_cookie_sessions_like_any_other() {
    let app = spawn_app_with(browser_settings()).await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let user = app.user_id(&email).await;
    let s = browser_login(&app, &email).await;
    let path = format!("/admin/users/{user}/sessions");
    let listed: Vec<Value> = app
        .call(Method::GET, &path, &admin.access, None)
        .await
        .json()
        .await
        .unwrap();
    assert!(listed.iter().any(|x| x["id"] == s.session_id.as_str()));
    let res = app.call(Method::DELETE, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(app.me(&s.access).await).await;
    let res = cookie_refresh(&app, &s).await;
    assert_cleared(res.headers());
    assert_invalid_grant(res, "revoked").await;
}

#[tokio::test]
async fn a_browser_reauthenticates_into_a_new_refresh_cookie() {
    let app = spawn_app_with(browser_settings()).await;
    let email = app.new_user().await;
    let s = browser_login(&app, &email).await;
    // Authenticated by the Bearer token; the refresh cookie says how to deliver.
    let res = app
        .client
        .post(app.url("/me/reauthenticate"))
        .bearer_auth(&s.access)
        .header("cookie", format!("__Host-tessera_refresh={}", s.refresh))
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let cookies = set_cookies(res.headers());
    let refresh = &cookies["__Host-tessera_refresh"];
    assert_ne!(refresh.value, s.refresh);
    assert!(refresh.has("httponly"));
    let body: Value = res.json().await.unwrap();
    assert!(body.get("refresh_token").is_none(), "{body}");
    assert_eq!(body["session_id"], s.session_id.as_str());
    let fresh = BrowserSession {
        refresh: refresh.value.clone(),
        csrf: body["csrf_token"].as_str().unwrap().into(),
        ..s.clone()
    };
    // The cookie from before is replaced; the new one refreshes.
    assert_invalid_grant(cookie_refresh(&app, &s).await, "unknown").await;
    cookie_refresh_ok(&app, &fresh).await;
}
