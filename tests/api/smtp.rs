//! A real SMTP server for the email tests: `tests/smtp/server.py` (aiosmtpd, Debian's
//! `python3-aiosmtpd`, installed by scripts/services.sh) on a free port, with STARTTLS
//! required (or implicit TLS) under a certificate made here for 127.0.0.1 by a CA made
//! here, and AUTH. Each delivered message lands in a directory the test reads.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use secrecy::SecretString;
use tessera::config::{EmailTransport, EmailVerification, Settings};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::test_settings;

pub const USER: &str = "tessera";
pub const PASSWORD: &str = "smtp pass/word";

/// How the server is started.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub implicit_tls: bool,
    /// No TLS at all (STARTTLS not offered): a server Tessera must refuse to use.
    pub no_tls: bool,
    /// Answer every recipient with this code (`"450"`, `"550"`).
    pub refuse: Option<&'static str>,
}

pub struct SmtpServer {
    pub port: u16,
    options: Options,
    dir: PathBuf,
    child: Option<Child>,
}

/// A delivered message as received (headers and MIME body).
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: String,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or("");
        let prefix = format!("{}:", name.to_ascii_lowercase());
        head.split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    }

    /// The body with quoted-printable soft line breaks and escapes undone (lettre writes
    /// long lines that way), so a link can be read whole.
    pub fn text(&self) -> String {
        let body = self.raw.replace("=\r\n", "");
        let mut out = Vec::new();
        let bytes = body.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (bytes[i], hex) {
                (b'=', Some(b)) => {
                    out.push(b);
                    i += 3;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Settings that send through `server`, with registration sending links.
pub fn mailing(server: &SmtpServer, verification: EmailVerification) -> Settings {
    let mut s = test_settings();
    s.email.transport = EmailTransport::Smtp;
    s.email.smtp_url = SecretString::from(server.url());
    s.email.smtp_ca_file = server.ca_file();
    s.email.smtp_timeout_secs = 5;
    s.email.link_base = "https://app.example/auth".into();
    s.email.verification = verification;
    s.email.retry_base_secs = 1;
    s.email.retry_max_secs = 1;
    s
}

/// The link's action and token.
pub fn link(mail: &Mail) -> (String, String) {
    let text = mail.text();
    let start = text
        .find("https://app.example/auth?action=")
        .unwrap_or_else(|| panic!("no link in {text}"));
    let link: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '<')
        .collect();
    let query = link.split_once('?').unwrap().1;
    let mut action = String::new();
    let mut token = String::new();
    for pair in query.split('&') {
        match pair.split_once('=').unwrap() {
            ("action", v) => action = v.to_owned(),
            ("token", v) => token = v.to_owned(),
            other => panic!("unexpected {other:?} in {link}"),
        }
    }
    (action, token)
}

impl SmtpServer {
    pub async fn start(options: Options) -> SmtpServer {
        let dir = std::env::temp_dir().join(format!("tessera-smtp-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("mail")).unwrap();
        let (ca, cert, key) = certificates();
        std::fs::write(dir.join("ca.pem"), ca).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let mut server = SmtpServer {
            port: crate::helpers::free_port(),
            options,
            dir,
            child: None,
        };
        server.run().await;
        server
    }

    async fn run(&mut self) {
        // Debian's interpreter: the one python3-aiosmtpd is installed for.
        let python = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let mut cmd = Command::new(python);
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/server.py"))
            .args(["--port", &self.port.to_string()])
            .arg("--cert")
            .arg(self.dir.join("cert.pem"))
            .arg("--key")
            .arg(self.dir.join("key.pem"))
            .arg("--maildir")
            .arg(self.dir.join("mail"))
            .args(["--auth", &format!("{USER}:{PASSWORD}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if self.options.implicit_tls {
            cmd.arg("--implicit-tls");
        }
        if self.options.no_tls {
            cmd.arg("--no-tls");
        }
        if let Some(code) = self.options.refuse {
            cmd.args(["--refuse", code]);
        }
        let mut child = cmd
            .spawn()
            .expect("python3 with aiosmtpd (scripts/services.sh installs python3-aiosmtpd)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the SMTP server did not start within 20 s");
        assert_eq!(
            ready.unwrap().as_deref(),
            Some("ready"),
            "the SMTP server did not start (is python3-aiosmtpd installed?)"
        );
        self.child = Some(child);
    }

    /// Stops the server (the port stays reserved for [`SmtpServer::resume`]).
    pub async fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
        }
    }

    /// Starts it again on the same port, keeping what it received.
    pub async fn resume(&mut self) {
        self.run().await;
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `email.smtp_url` for this server, with its credentials.
    pub fn url(&self) -> String {
        let scheme = if self.options.implicit_tls {
            "smtps"
        } else {
            "smtp"
        };
        let password = PASSWORD.replace('/', "%2F").replace(' ', "%20");
        format!("{scheme}://{USER}:{password}@127.0.0.1:{}", self.port)
    }

    /// What has been delivered so far, oldest first.
    pub fn messages(&self) -> Vec<Mail> {
        let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(self.dir.join("mail"))
            .unwrap()
            .filter_map(|e| {
                let path = e.ok()?.path();
                let n = path.file_stem()?.to_str()?.parse().ok()?;
                (path.extension()? == "eml").then_some((n, path))
            })
            .collect();
        numbered.sort();
        numbered
            .into_iter()
            .map(|(_, path)| Mail {
                raw: std::fs::read_to_string(path).unwrap(),
            })
            .collect()
    }

    /// Waits until at least `n` messages have arrived (at most `within`).
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} messages arrived within {within:?}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.start_kill().ok();
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// A CA, and a certificate for 127.0.0.1 and localhost that it signed, with the key:
/// (CA PEM, certificate PEM, key PEM).
pub fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}
