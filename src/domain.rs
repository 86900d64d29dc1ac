//! Parsed input types: once a value has one of these types it is known to be valid, so
//! the rest of the code never re-checks it, and ids of different kinds cannot be mixed.

use std::fmt;
use std::net::IpAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The role that lets a caller use the admin routes.
pub const ADMIN_ROLE: &str = "admin";
/// The only role of a user made by `POST /users/anonymous` until it is converted.
pub const ANONYMOUS_ROLE: &str = "anonymous";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub Uuid);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An email address as the user typed it (trimmed), compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("email is required");
        }
        if s.len() > Self::MAX_LEN {
            return Err("email is longer than 254 characters");
        }
        let Some((local, domain)) = s.split_once('@') else {
            return Err("email must look like name@example.com");
        };
        let bad_char = |c: char| c.is_whitespace() || c.is_control() || c == '@';
        if local.is_empty()
            || domain.is_empty()
            || local.chars().any(bad_char)
            || domain.chars().any(bad_char)
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err("email must look like name@example.com");
        }
        Ok(Email(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The one form an email is known by: for lookup, uniqueness (stored in
    /// `users.email_normalized`, which has the unique index) and the login throttles
    /// alike, so no two of them can disagree about which account an address names.
    /// Unicode compatibility composition (NFKC: full-width and other look-alike forms
    /// become the plain ones), then Unicode lower-casing (Rust's, with the final-sigma
    /// rule and `İ` as `i` + combining dot), then canonical composition (NFC) again.
    /// The database never re-derives it (`lower()` follows the server's locale).
    pub fn normalized(&self) -> String {
        use unicode_normalization::UnicodeNormalization;
        let folded: String = self.0.nfkc().collect::<String>().to_lowercase();
        folded.nfc().collect()
    }
}

/// A password exactly as typed: no trimming, truncation or case folding.
pub struct Password(SecretString);

impl Password {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_BYTES: usize = 1024;

    /// For a new password: length rules apply.
    pub fn parse_new(raw: String) -> Result<Self, &'static str> {
        if raw.chars().count() < Self::MIN_CHARS {
            return Err("password must be at least 8 characters");
        }
        Self::parse_existing(raw)
    }

    /// For a password being checked: only the size bound applies, so that policy
    /// changes never lock out existing users.
    pub fn parse_existing(raw: String) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("password is required");
        }
        if raw.len() > Self::MAX_BYTES {
            return Err("password is longer than 1024 bytes");
        }
        Ok(Password(SecretString::from(raw)))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_checked_and_normalized() {
        let e = Email::parse("  Alice@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "Alice@Example.COM");
        assert_eq!(e.normalized(), "alice@example.com");
        let n = |s: &str| Email::parse(s).unwrap().normalized();
        // Dotted capital I lower-cases to i + U+0307, not to plain i (as some locales' lower() does).
        assert_eq!(n("İrem@example.com"), "i\u{307}rem@example.com");
        assert_ne!(n("İrem@example.com"), n("irem@example.com"));
        // Final sigma, composed and decomposed forms, full-width letters.
        assert_eq!(n("ΟΔΟΣ@example.com"), "οδος@example.com");
        assert_eq!(n("Ze\u{301}@example.com"), n("Zé@example.com"));
        assert_eq!(n("ＡＢ@example.com"), "ab@example.com");
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "a b@c.d",
            "a@b c",
            "a@.com",
            "a@b@c",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Email::parse(&format!("{}@x.io", "a".repeat(260))).is_err());
    }

    #[test]
    fn passwords_are_kept_exactly_as_typed() {
        let p = Password::parse_new(" spaced out ".into()).unwrap();
        assert_eq!(p.expose(), " spaced out ");
        assert!(Password::parse_new("short".into()).is_err());
        assert!(Password::parse_new("x".repeat(1025)).is_err());
        assert!(Password::parse_new("é".repeat(8)).is_ok());
        assert!(Password::parse_existing("short".into()).is_ok());
        assert_eq!(format!("{p:?}"), "Password([redacted])");
    }
}

/// SHA-256 of `bytes`, as a fixed-size key (remembered tokens, key fingerprints, budget
/// keys).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A signing algorithm Tessera supports (`tokens.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Es256,
    EdDsa,
    Rs256,
    Hs256,
}

impl KeyAlgorithm {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "ES256" => KeyAlgorithm::Es256,
            "EdDSA" => KeyAlgorithm::EdDsa,
            "RS256" => KeyAlgorithm::Rs256,
            "HS256" => KeyAlgorithm::Hs256,
            other => {
                anyhow::bail!("unsupported algorithm {other:?}: use ES256, EdDSA, RS256 or HS256")
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Es256 => "ES256",
            KeyAlgorithm::EdDsa => "EdDSA",
            KeyAlgorithm::Rs256 => "RS256",
            KeyAlgorithm::Hs256 => "HS256",
        }
    }
}

/// An IP address or CIDR range from `server.trusted_proxies`.
#[derive(Debug, Clone, Copy)]
pub struct IpRange {
    addr: IpAddr,
    prefix: u8,
}

impl IpRange {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>()?, Some(p.parse::<u8>()?)),
            None => (s.parse::<IpAddr>()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        anyhow::ensure!(prefix <= max, "prefix length {prefix} is too long");
        Ok(IpRange { addr, prefix })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        let to_bits = |ip: &IpAddr| match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(*v4)) << 96, true),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => (u128::from(u32::from(v4)) << 96, true),
                None => (u128::from(*v6), false),
            },
        };
        let (net, net_v4) = to_bits(&self.addr);
        let (ip, ip_v4) = to_bits(ip);
        if net_v4 != ip_v4 {
            return false;
        }
        // IPv4 addresses sit in the top 32 bits, so one mask serves both families.
        let prefix = u32::from(self.prefix);
        if prefix == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - prefix);
        (net & mask) == (ip & mask)
    }
}

/// The origin (`scheme://host[:port]`, RFC 6454) of an `http`/`https` URL, in the form
/// browsers send in `Origin`: lower case, the default port left out, no path. `None`
/// for anything else (another scheme, user info, no host).
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod origin_tests {
    use super::origin_of;

    #[test]
    fn origins_are_what_browsers_send() {
        for (url, origin) in [
            (
                "https://Auth.Example.com/",
                Some("https://auth.example.com"),
            ),
            (
                "https://auth.example.com:443/x",
                Some("https://auth.example.com"),
            ),
            ("http://127.0.0.1:8080", Some("http://127.0.0.1:8080")),
            ("http://localhost:80?x", Some("http://localhost")),
            ("ftp://example.com", None),
            ("https://user@example.com", None),
            ("https://", None),
            ("null", None),
        ] {
            assert_eq!(origin_of(url).as_deref(), origin, "{url}");
        }
    }
}
