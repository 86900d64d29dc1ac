//! Request extractors that turn any bad input into the contract's 4xx bodies.
//!
//! Bodies are read by hand with a hard 64 KiB cap (413 past it, checked against
//! `Content-Length` first and then while streaming), so actix's own plain-text errors
//! never reach a client. Parse errors are described without echoing submitted values,
//! which could be passwords.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::AppState;
use crate::auth::access_token::Claims;
pub use crate::domain::IpRange;
use crate::error::ApiError;
use crate::store::ClientInfo;

pub const BODY_LIMIT: usize = 64 * 1024;
const USER_AGENT_MAX: usize = 512;

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, ApiError>>>>;

/// A JSON body (`application/json` required).
pub struct Json<T>(pub T);
/// A JSON body that may be absent (empty body, no content type).
pub struct OptionalJson<T>(pub Option<T>);
/// A form body (`application/x-www-form-urlencoded`), or JSON.
pub struct Form<T>(pub T);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Json,
    Form,
}

fn content_kind(req: &HttpRequest) -> Result<Option<Kind>, ApiError> {
    let mime = req
        .mime_type()
        .map_err(|_| ApiError::InvalidRequest("Content-Type header is malformed".into()))?;
    Ok(mime.and_then(|m| {
        let json = m.subtype() == mime::JSON || m.suffix() == Some(mime::JSON);
        let form = m.type_() == mime::APPLICATION && m.subtype() == mime::WWW_FORM_URLENCODED;
        if json {
            Some(Kind::Json)
        } else if form {
            Some(Kind::Form)
        } else {
            None
        }
    }))
}

async fn read_body(req: &HttpRequest, mut payload: Payload) -> Result<web::Bytes, ApiError> {
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        let len: usize = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::InvalidRequest("Content-Length header is malformed".into()))?;
        if len > BODY_LIMIT {
            return Err(ApiError::PayloadTooLarge);
        }
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::InvalidRequest("request body could not be read".into()))?;
        if body.len() + chunk.len() > BODY_LIMIT {
            return Err(ApiError::PayloadTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn parse<T: DeserializeOwned>(kind: Kind, body: &[u8]) -> Result<T, ApiError> {
    match kind {
        Kind::Json => {
            serde_json::from_slice(body).map_err(|e| ApiError::InvalidRequest(describe_json(&e)))
        }
        Kind::Form => {
            if std::str::from_utf8(body).is_err() {
                return Err(ApiError::InvalidRequest(
                    "request body is not valid UTF-8".into(),
                ));
            }
            serde_urlencoded::from_bytes(body)
                .map_err(|e| ApiError::InvalidRequest(describe_form(&e.to_string())))
        }
    }
}

/// serde's messages can quote the offending value (maybe a password): keep only the
/// field names and the kind of problem.
fn describe_json(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let msg = e.to_string();
    match e.classify() {
        Category::Syntax | Category::Eof
            if msg.contains("invalid unicode") || msg.contains("UTF-8") =>
        {
            "request body is not valid UTF-8".into()
        }
        Category::Syntax | Category::Eof | Category::Io => "request body is not valid JSON".into(),
        Category::Data => describe_form(&msg),
    }
}

fn describe_form(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("missing field ") {
        let field = rest.split(' ').next().unwrap_or_default();
        return format!("missing field {field}");
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let field: String = rest
            .split(',')
            .next()
            .unwrap_or_default()
            .chars()
            .take(66)
            .collect();
        return format!("unknown field {field}");
    }
    if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        return "a field has the wrong type".into();
    }
    "request body has invalid fields".into()
}

/// Reads and parses a body. JSON is always accepted, forms only with `accept_form`; an
/// empty body is `None` only when `optional`.
async fn body<T: DeserializeOwned>(
    req: HttpRequest,
    payload: Payload,
    accept_form: bool,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let kind = content_kind(&req)?;
    let body = read_body(&req, payload).await?;
    if optional && body.is_empty() {
        return Ok(None);
    }
    match kind {
        Some(Kind::Json) => parse(Kind::Json, &body).map(Some),
        Some(Kind::Form) if accept_form => parse(Kind::Form, &body).map(Some),
        _ if accept_form => Err(ApiError::InvalidRequest(
            "Content-Type must be application/x-www-form-urlencoded".into(),
        )),
        _ => Err(ApiError::InvalidRequest(
            "Content-Type must be application/json".into(),
        )),
    }
}

fn required<T>(value: Option<T>) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::InvalidRequest("request body is required".into()))
}

macro_rules! body_extractor {
    ($name:ident, accept_form: $form:expr, optional: $optional:expr, $wrap:expr) => {
        impl<T: DeserializeOwned + 'static> FromRequest for $name<T> {
            type Error = ApiError;
            type Future = Boxed<Self>;

            fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
                let (req, payload) = (req.clone(), payload.take());
                Box::pin(async move {
                    body::<T>(req, payload, $form, $optional)
                        .await
                        .and_then($wrap)
                })
            }
        }
    };
}

body_extractor!(Json, accept_form: false, optional: false, |v| required(v).map(Json));
body_extractor!(OptionalJson, accept_form: false, optional: true, |v| Ok(OptionalJson(v)));
body_extractor!(Form, accept_form: true, optional: false, |v| required(v).map(Form));

/// The query string, parsed like a form body (sanitized errors, 400 on bad input).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let parsed = serde_urlencoded::from_str(req.query_string())
            .map(Query)
            .map_err(|e| ApiError::InvalidRequest(describe_form(&e.to_string())));
        std::future::ready(parsed)
    }
}

/// A verified, unrevoked access token from `Authorization: Bearer`.
pub struct Authenticated(pub Claims);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Boxed<Self>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer_token(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no app state")))?;
            let token = token.ok_or(ApiError::InvalidToken)?;
            state.auth.authenticate(&token).await.map(Authenticated)
        })
    }
}

/// An access token if the request has an `Authorization` header (which must then hold a
/// valid, unrevoked token: 401 otherwise), `None` if it has none.
pub struct MaybeAuthenticated(pub Option<Claims>);

impl FromRequest for MaybeAuthenticated {
    type Error = ApiError;
    type Future = Boxed<Self>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        if !req.headers().contains_key(header::AUTHORIZATION) {
            return Box::pin(async { Ok(MaybeAuthenticated(None)) });
        }
        let authenticated = Authenticated::from_request(req, payload);
        Box::pin(async move { Ok(MaybeAuthenticated(Some(authenticated.await?.0))) })
    }
}

/// An authenticated caller holding the `admin` role: 401 without a valid token, 403
/// `insufficient_scope` without the role, 401 `insufficient_user_authentication` when
/// `mfa.required_for_roles` lists `admin` and the token's `amr` lacks `otp`. Roles come from the token; a role change
/// revokes the user's earlier tokens at once, so they cannot be stale.
pub struct Admin(pub Claims);

pub use crate::domain::ADMIN_ROLE;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Boxed<Self>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let authenticated = Authenticated::from_request(req, payload);
        Box::pin(async move {
            let Authenticated(claims) = authenticated.await?;
            let state = state.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no app state")))?;
            state.auth.require_role(&claims, ADMIN_ROLE)?;
            Ok(Admin(claims))
        })
    }
}

pub(crate) fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The request's id: a well-formed `X-Request-Id` from a trusted proxy, else a new
/// UUID. Echoed in the response, in the request's log span and in the audit rows it
/// writes.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Longest `X-Request-Id` taken from a proxy.
const REQUEST_ID_MAX: usize = 128;

impl RequestId {
    /// `header` is taken only from a peer in `trusted`, and only if it is 1 to 128
    /// characters of letters, digits and `-_.:/+=@` (so it cannot forge log lines or
    /// carry anything large); otherwise a new UUID.
    pub fn of(
        peer: Option<IpAddr>,
        header: Option<&header::HeaderValue>,
        trusted: &[IpRange],
    ) -> Self {
        let from_proxy = peer.is_some_and(|ip| trusted.iter().any(|r| r.contains(&ip)));
        let given = header
            .filter(|_| from_proxy)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=REQUEST_ID_MAX).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
            });
        RequestId(given.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned))
    }
}

/// Who is calling: client IP (trusting `X-Forwarded-For` only from configured proxies),
/// User-Agent, and the request's id.
pub struct Caller {
    pub ip: IpAddr,
    pub info: ClientInfo,
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let trusted = req
            .app_data::<web::Data<AppState>>()
            .map(|s| s.trusted_proxies.as_slice())
            .unwrap_or_default();
        let peer = req
            .peer_addr()
            .map_or(IpAddr::from([127, 0, 0, 1]), |a| a.ip());
        let ip = client_ip(peer, req.headers().get_all("x-forwarded-for"), trusted);
        let user_agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(USER_AGENT_MAX).collect());
        std::future::ready(Ok(Caller {
            ip,
            info: ClientInfo {
                ip: Some(ip.to_string()),
                user_agent,
                request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
            },
        }))
    }
}

/// Walks `X-Forwarded-For` from the right: each hop that is a trusted proxy passes the
/// question on to the address it received from; the first untrusted address is the
/// client. The walk stops at the first entry that is not an address (`unknown`, junk):
/// the last trusted hop before it is then the best answer there is. So junk or spoofed
/// entries that a client puts on the left never matter, and one bad entry no longer
/// sends every client into the proxy's bucket. `ip:port` and `[v6]:port` entries, as
/// some proxies write them, count as their address. With no trusted peer: the peer.
fn client_ip<'a>(
    peer: IpAddr,
    forwarded: impl DoubleEndedIterator<Item = &'a header::HeaderValue>,
    trusted: &[IpRange],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|r| r.contains(ip));
    let mut client = peer;
    if !is_trusted(&client) {
        return client;
    }
    // Header lines in order, each split at commas; walked from the last entry.
    let entries = forwarded
        .rev()
        .flat_map(|v| v.to_str().unwrap_or("").rsplit(','));
    for entry in entries {
        let Some(hop) = forwarded_address(entry.trim()) else {
            break;
        };
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry as an address: `ip`, `ip:port` (IPv4) or `[ip]:port`.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (ip, port) = rest.split_once(']')?;
        return (port.is_empty() || port.strip_prefix(':')?.parse::<u16>().is_ok())
            .then(|| ip.parse().ok())
            .flatten();
    }
    let (ip, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> header::HeaderValue {
        header::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges_match_addresses_and_cidrs() {
        let r = IpRange::parse("10.0.0.0/8").unwrap();
        assert!(r.contains(&"10.1.2.3".parse().unwrap()));
        assert!(!r.contains(&"11.0.0.1".parse().unwrap()));
        assert!(r.contains(&"::ffff:10.9.9.9".parse().unwrap()));
        let one = IpRange::parse("127.0.0.1").unwrap();
        assert!(one.contains(&"127.0.0.1".parse().unwrap()));
        assert!(!one.contains(&"127.0.0.2".parse().unwrap()));
        assert!(
            IpRange::parse("fd00::/8")
                .unwrap()
                .contains(&"fd12::1".parse().unwrap())
        );
        assert!(IpRange::parse("10.0.0.0/33").is_err());
        assert!(IpRange::parse("nonsense").is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let xff = [hv("203.0.113.9, 10.0.0.7")];
        assert_eq!(client_ip(peer, xff.iter(), &[]), peer);
        let trusted = [IpRange::parse("10.0.0.0/8").unwrap()];
        assert_eq!(
            client_ip(peer, xff.iter(), &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let spoofed = [hv("garbage")];
        assert_eq!(client_ip(peer, spoofed.iter(), &trusted), peer);
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        for chain in [
            "x, 203.0.113.9",
            "unknown, 203.0.113.9, 10.0.0.7",
            "198.51.100.66, 203.0.113.9",
            "203.0.113.9:4711",
            "198.51.100.66,203.0.113.9 ,10.0.0.8:80",
        ] {
            assert_eq!(
                client_ip(peer, [hv(chain)].iter(), &trusted),
                client,
                "{chain}"
            );
        }
        // Several header lines form one list, in order.
        let lines = [hv("198.51.100.66"), hv("203.0.113.9, 10.0.0.7")];
        assert_eq!(client_ip(peer, lines.iter(), &trusted), client);
        // A bad entry right of the client: the last trusted hop is all we know.
        let broken = [hv("203.0.113.9, unknown, 10.0.0.7")];
        assert_eq!(
            client_ip(peer, broken.iter(), &trusted),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(peer, [hv("[2001:db8::1]:443")].iter(), &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let untrusted_peer: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(untrusted_peer, xff.iter(), &trusted),
            untrusted_peer
        );
    }
}
