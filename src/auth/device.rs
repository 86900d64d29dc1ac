//! Known devices: OWASP's "device cookie" defence against lockout by strangers.
//!
//! The per-account login budget is shared by everyone who types an email, so on its
//! own it lets anyone keep the owner out by failing on purpose. Every successful login
//! therefore hands out a device token (256 bits, only its SHA-256 is stored, bound to
//! the account). A later login or password change presenting a valid device token for
//! the account it names is counted in that device's own budget
//! (`login.device_free_failures`, no delay) instead of the shared one: neither the
//! account's delay nor the per-account quota applies to it. Past its free failures a
//! device stops counting as known until its next success, so a stolen device token
//! buys an attacker no more than `device_free_failures` extra guesses.
//!
//! What a stranger can still do: keep a *new* device of the owner (no device token,
//! e.g. a fresh browser) in the shared delay, as before.

use std::fmt;

use super::refresh_token::RefreshToken;

/// A device token in plain text; `Debug` never shows it. Same format as a refresh
/// token (256 bits of CSPRNG output, base64url), but never interchangeable with one:
/// it is looked up only in the devices table.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(RefreshToken);

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceToken([redacted])")
    }
}

impl DeviceToken {
    pub fn generate() -> Self {
        DeviceToken(RefreshToken::generate())
    }

    /// `None` for anything that cannot have been issued (it then counts as absent).
    pub fn parse(s: &str) -> Option<Self> {
        RefreshToken::parse(s).map(DeviceToken)
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// What the store keeps.
    pub fn hash(&self) -> Vec<u8> {
        self.0.hash()
    }

    /// The key of this device's failure budget (hex of the stored hash).
    pub fn budget_key(&self) -> String {
        self.hash().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_tokens_are_redacted_and_parse_like_issued_tokens() {
        let d = DeviceToken::generate();
        assert_eq!(DeviceToken::parse(d.expose()), Some(d.clone()));
        assert!(DeviceToken::parse("junk").is_none());
        assert_eq!(format!("{d:?}"), "DeviceToken([redacted])");
        assert_eq!(d.budget_key().len(), 64);
    }
}
