//! Security notices (`email.notify`): messages to a user's own address about something
//! done to their account (a login from somewhere new, a password changed, an email
//! change asked for, a refresh token replayed). A notice never carries a token or a
//! link that acts; it tells the user what happened, when and from where.
//!
//! Each notice is an outbox row written in the transaction of the change it reports
//! (see [`crate::outbox`]), so a notice is sent if and only if the change committed.
//! Where the caller does not know the address yet (a reset link names only a token; a
//! replayed refresh token only a session), the store is given a [`NoticeFor`] that
//! seals the message to the address it finds in that transaction.
//!
//! `new_device` compares a login with where the account's earlier logins and its own
//! registration came from (the audit rows, `cleanup.audit_retention_secs`): it is sent
//! when the client shows no known device token and no earlier one came from the same
//! network (IPv4 /24, IPv6 /48) with the same browser (the User-Agent with its digits
//! taken out, so a browser update is not a new device). An account with no earlier
//! origin on record (an admin-made account's first login) gets none: there is nothing
//! to compare with, and the user has just been told of the account.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use chrono::Utc;

use super::session::AuthService;
use crate::config::{EmailTransport, NoticeKind};
use crate::domain::UserId;
use crate::email::templates::Template;
use crate::outbox::{Item, Outbox};
use crate::store::{ClientInfo, NoticeFor};

/// How many of the latest logins a `new_device` check looks at.
const ORIGINS_COMPARED: i64 = 200;

impl NoticeKind {
    fn template(self) -> Template {
        match self {
            NoticeKind::NewDevice => Template::NewDevice,
            NoticeKind::PasswordChanged => Template::PasswordChanged,
            NoticeKind::EmailChanged => Template::EmailChanged,
            NoticeKind::SessionReuseDetected => Template::SessionReuseDetected,
        }
    }
}

impl AuthService {
    fn notifies(&self, kind: NoticeKind) -> bool {
        let email = &self.settings().email;
        email.transport != EmailTransport::None && email.notify.contains(&kind)
    }

    /// A notice of `kind` to `to`, sealed for the outbox; `None` when `email.notify`
    /// leaves it out (or nothing is sent at all). `values` come beside `email` and
    /// `when`.
    pub(crate) fn notice(
        &self,
        kind: NoticeKind,
        user: UserId,
        to: &str,
        values: &[(&str, String)],
    ) -> Option<Vec<u8>> {
        self.notifies(kind)
            .then(|| seal(&self.outbox, kind, user, to, values))
    }

    /// As [`AuthService::notice`], for a change whose user and address the store finds.
    pub(crate) fn notice_for(&self, kind: NoticeKind) -> Option<NoticeFor> {
        if !self.notifies(kind) {
            return None;
        }
        let outbox = self.outbox.clone();
        Some(Arc::new(move |user, to: &str| {
            seal(&outbox, kind, user, to, &[])
        }))
    }

    /// The `new_device` notice for a login that showed no known device token, if the
    /// account has logged in (or registered) before and never from this network with
    /// this browser. A store error costs the notice, never the login.
    pub(super) async fn new_device_notice(
        &self,
        user: UserId,
        to: &str,
        client: &ClientInfo,
    ) -> Option<Vec<u8>> {
        if !self.notifies(NoticeKind::NewDevice) {
            return None;
        }
        let origins = match self.store.login_origins(user, ORIGINS_COMPARED).await {
            Ok(origins) => origins,
            Err(e) => {
                tracing::warn!(error = %e, "could not read earlier logins; no new_device notice");
                return None;
            }
        };
        let here = Origin::of(client);
        if origins.is_empty() || origins.iter().any(|o| Origin::of(o) == here) {
            return None;
        }
        let values = [
            ("ip", client.ip.clone().unwrap_or_else(|| "unknown".into())),
            (
                "user_agent",
                client
                    .user_agent
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
            ),
        ];
        Some(seal(&self.outbox, NoticeKind::NewDevice, user, to, &values))
    }
}

/// A notice of `kind` to `to`, with `email`, `when` and `values`, sealed for the outbox.
fn seal(
    outbox: &Outbox,
    kind: NoticeKind,
    user: UserId,
    to: &str,
    values: &[(&str, String)],
) -> Vec<u8> {
    let mut all: BTreeMap<String, String> = values
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    all.insert("email".into(), to.to_owned());
    all.insert(
        "when".into(),
        Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
    );
    outbox.seal(&Item::Email {
        user: Some(user),
        template: kind.template().name().to_owned(),
        to: to.to_owned(),
        values: all,
    })
}

/// Where a login came from, as `new_device` compares it.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    network: Option<IpAddr>,
    browser: String,
}

impl Origin {
    fn of(client: &ClientInfo) -> Self {
        Origin {
            network: client
                .ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .map(network),
            browser: client
                .user_agent
                .as_deref()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect(),
        }
    }
}

/// An address's network: its /24 (IPv4, IPv4-mapped IPv6 included) or /48 (IPv6).
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 80))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str, ua: &str) -> ClientInfo {
        ClientInfo {
            ip: Some(ip.into()),
            user_agent: Some(ua.into()),
            request_id: None,
        }
    }

    #[test]
    fn an_origin_is_a_network_and_a_browser_without_its_version() {
        let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
        let updated = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
        let here = Origin::of(&client("203.0.113.7", firefox));
        assert_eq!(here, Origin::of(&client("203.0.113.200", updated)));
        assert_eq!(here, Origin::of(&client("::ffff:203.0.113.9", firefox)));
        assert_ne!(here, Origin::of(&client("203.0.114.7", firefox)));
        assert_ne!(here, Origin::of(&client("203.0.113.7", "curl/8.5.0")));
        let v6 = Origin::of(&client("2001:db8:1:2::1", firefox));
        assert_eq!(v6, Origin::of(&client("2001:db8:1:ffff::9", firefox)));
        assert_ne!(v6, Origin::of(&client("2001:db8:2::1", firefox)));
    }
}
