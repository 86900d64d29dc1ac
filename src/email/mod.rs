//! Outgoing email: the transport (`email.transport`: none, log or SMTP over TLS) and
//! the templates messages are rendered from ([`templates`]).
//!
//! Nothing here is called from a request: requests write what to send into the outbox
//! in the transaction of the change it reports, and a background sender delivers it
//! through [`Mailer::send`], retrying what fails for a reason that may pass
//! ([`SendError::Retry`]).

pub mod templates;

use std::time::Duration;

use anyhow::{Context, bail};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::{EmailSettings, EmailTransport};

/// One message, rendered.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl std::fmt::Debug for Message {
    // The body holds links with tokens, and the address is personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Why a message was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later (the server is down, busy, or answered 4xx).
    #[error("delivery failed for now: {0}")]
    Retry(String),
    /// Trying again cannot help (a 5xx answer, an address that cannot be written).
    #[error("delivery refused: {0}")]
    Permanent(String),
}

/// Where messages go.
pub struct Mailer {
    from: Mailbox,
    transport: Transport,
}

enum Transport {
    None,
    Log,
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

impl Mailer {
    pub fn from_settings(settings: &EmailSettings) -> anyhow::Result<Self> {
        let from = parse_from(&settings.from)?;
        let transport = match settings.transport {
            EmailTransport::None => Transport::None,
            EmailTransport::Log => Transport::Log,
            EmailTransport::Smtp => Transport::Smtp(smtp_transport(settings)?),
        };
        Ok(Mailer { from, transport })
    }

    /// Whether anything is sent at all (`email.transport` is not `none`).
    pub fn sends(&self) -> bool {
        !matches!(self.transport, Transport::None)
    }

    pub async fn send(&self, message: &Message) -> Result<(), SendError> {
        match &self.transport {
            Transport::None => Ok(()),
            Transport::Log => {
                tracing::warn!(
                    to = %message.to,
                    subject = %message.subject,
                    body = %message.text,
                    "email (email.transport = \"log\": development only)"
                );
                Ok(())
            }
            Transport::Smtp(smtp) => {
                let email = self.build(message)?;
                smtp.send(email).await.map(|_| ()).map_err(|e| {
                    // A server's answer can repeat the address: only its code is kept.
                    let why = match e.status() {
                        Some(code) => format!("the SMTP server answered {code}"),
                        None => e.to_string(),
                    };
                    if e.is_permanent() {
                        SendError::Permanent(why)
                    } else {
                        SendError::Retry(why)
                    }
                })
            }
        }
    }

    fn build(&self, message: &Message) -> Result<lettre::Message, SendError> {
        let to: Mailbox = message.to.parse().map_err(|_| {
            SendError::Permanent("the recipient's address cannot be written".into())
        })?;
        lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&message.subject)
            .multipart(MultiPart::alternative_plain_html(
                message.text.clone(),
                message.html.clone(),
            ))
            .map_err(|e| SendError::Permanent(e.to_string()))
    }
}

fn parse_from(from: &str) -> anyhow::Result<Mailbox> {
    from.parse().map_err(|_| {
        anyhow::anyhow!(
            "email.from {from:?} is not an address such as \"Example <no-reply@example.com>\""
        )
    })
}

/// The SMTP server `email.smtp_url` names.
#[derive(Debug, PartialEq, Eq)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    /// true: `smtps://` (TLS from the first byte); false: STARTTLS, required.
    pub implicit_tls: bool,
    pub user: Option<String>,
    password: Option<String>,
}

impl SmtpTarget {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        // The URL holds a password: no error here repeats it.
        let parsed = url::Url::parse(url).map_err(|_| {
            anyhow::anyhow!(
                "email.smtp_url is not a URL; write smtp://user:password@host:587 or \
                 smtps://user:password@host:465"
            )
        })?;
        let implicit_tls = match parsed.scheme() {
            "smtp" => false,
            "smtps" => true,
            _ => bail!(
                "email.smtp_url must start with smtp:// (STARTTLS, required) or smtps:// \
                 (implicit TLS)"
            ),
        };
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host.trim_matches(['[', ']']).to_owned(),
            _ => bail!("email.smtp_url names no host"),
        };
        if parsed.path() != "" && parsed.path() != "/" || parsed.query().is_some() {
            bail!("email.smtp_url takes no path or query: smtp://user:password@host:port");
        }
        let decode = |s: &str| {
            percent_decode(s).context("email.smtp_url: the user or password is not valid UTF-8")
        };
        let user = match parsed.username() {
            "" => None,
            user => Some(decode(user)?),
        };
        let password = parsed.password().map(decode).transpose()?;
        if user.is_some() != password.is_some() {
            bail!("email.smtp_url: give both a user and a password, or neither");
        }
        Ok(SmtpTarget {
            port: parsed
                .port()
                .unwrap_or(if implicit_tls { 465 } else { 587 }),
            host,
            implicit_tls,
            user,
            password,
        })
    }
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])?;
            out.push(u8::from_str_radix(hex, 16)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

fn smtp_transport(settings: &EmailSettings) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let target = SmtpTarget::parse(settings.smtp_url.expose_secret())?;
    let mut tls = TlsParameters::builder(target.host.clone());
    if !settings.smtp_ca_file.as_os_str().is_empty() {
        let pem = std::fs::read(&settings.smtp_ca_file).with_context(|| {
            format!(
                "cannot read email.smtp_ca_file {}",
                settings.smtp_ca_file.display()
            )
        })?;
        let ca = Certificate::from_pem(&pem).with_context(|| {
            format!(
                "email.smtp_ca_file {} is not a PEM certificate",
                settings.smtp_ca_file.display()
            )
        })?;
        tls = tls.add_root_certificate(ca);
    }
    let tls = tls.build_rustls().context("cannot set up TLS for SMTP")?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&target.host)
        .port(target.port)
        .timeout(Some(Duration::from_secs(settings.smtp_timeout_secs.max(1))))
        .tls(if target.implicit_tls {
            Tls::Wrapper(tls)
        } else {
            Tls::Required(tls)
        });
    if let (Some(user), Some(password)) = (target.user, target.password) {
        builder = builder.credentials(Credentials::new(user, password));
    }
    Ok(builder.build())
}

impl EmailSettings {
    /// Checks what can be checked before anything is sent.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        parse_from(&self.from)?;
        if self.verification != crate::config::EmailVerification::Off
            && self.transport == EmailTransport::None
        {
            bail!(
                "email.verification = optional or required sends links: set email.transport \
                 to smtp (or log, for development)"
            );
        }
        if [
            self.verify_ttl_secs,
            self.reset_ttl_secs,
            self.invite_ttl_secs,
            u64::from(self.per_ip_per_hour),
            u64::from(self.per_address_per_hour),
        ]
        .contains(&0)
        {
            bail!(
                "email.verify_ttl_secs, email.reset_ttl_secs, email.per_ip_per_hour and \
                 email.per_address_per_hour must be positive"
            );
        }
        if self.transport == EmailTransport::Smtp {
            SmtpTarget::parse(self.smtp_url.expose_secret())?;
        }
        let link = url::Url::parse(&self.link_base).map_err(|_| {
            anyhow::anyhow!(
                "email.link_base must be the URL of the app page that receives email links, \
                 e.g. https://app.example.com/auth"
            )
        })?;
        if !matches!(link.scheme(), "https" | "http") || link.query().is_some() {
            bail!("email.link_base must be an http(s) URL without a query");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_are_read_with_their_tls_mode_and_decoded_credentials() {
        let t = SmtpTarget::parse("smtp://me%40x.com:p%2Fss@mail.example.com").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.implicit_tls),
            ("mail.example.com", 587, false)
        );
        assert_eq!(t.user.as_deref(), Some("me@x.com"));
        assert_eq!(t.password.as_deref(), Some("p/ss"));
        let t = SmtpTarget::parse("smtps://relay:2465").unwrap();
        assert_eq!((t.port, t.implicit_tls, t.user), (2465, true, None));
        for bad in [
            "http://host",
            "smtp://",
            "smtp://user@host",
            "smtp://host/path",
            "smtp://host?tls=none",
            "not a url",
        ] {
            let err = SmtpTarget::parse(bad).unwrap_err().to_string();
            assert!(err.contains("email.smtp_url"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_bad_smtp_url_error_never_repeats_the_password() {
        let err = SmtpTarget::parse("smtp://u:hunter2@host/x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
