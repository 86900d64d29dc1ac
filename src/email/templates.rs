//! The messages Tessera sends, rendered from templates: built-in ones (English, in
//! `templates/email/`, compiled in), each overridable by a file of the same name in
//! `email.templates_dir`.
//!
//! A template is two files: `NAME.txt`, whose first line is `Subject: …` followed by an
//! empty line and the plain-text body, and `NAME.html`, the HTML body. `{{name}}` stands
//! for a value; which values a template may use is fixed per template (see
//! [`Template::variables`]), and an override using another is refused at start, so a
//! typo never reaches a user as a literal `{{…}}`. Values are HTML-escaped in the HTML
//! body and in nothing else.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};

/// Every message Tessera sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Template {
    VerifyEmail,
    ResetPassword,
    ConfirmEmailChange,
    Invitation,
    NewDevice,
    PasswordChanged,
    EmailChanged,
    SessionReuseDetected,
}

impl Template {
    pub const ALL: [Template; 8] = [
        Template::VerifyEmail,
        Template::ResetPassword,
        Template::ConfirmEmailChange,
        Template::Invitation,
        Template::NewDevice,
        Template::PasswordChanged,
        Template::EmailChanged,
        Template::SessionReuseDetected,
    ];

    /// The file name without extension, and the name the outbox stores.
    pub fn name(self) -> &'static str {
        match self {
            Template::VerifyEmail => "verify_email",
            Template::ResetPassword => "reset_password",
            Template::ConfirmEmailChange => "confirm_email_change",
            Template::Invitation => "invitation",
            Template::NewDevice => "new_device",
            Template::PasswordChanged => "password_changed",
            Template::EmailChanged => "email_changed",
            Template::SessionReuseDetected => "session_reuse_detected",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Template::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The values the template may use. Links (`link`) act; notices carry none.
    pub fn variables(self) -> &'static [&'static str] {
        match self {
            Template::VerifyEmail
            | Template::ResetPassword
            | Template::ConfirmEmailChange
            | Template::Invitation => &["email", "link", "expires_in"],
            Template::NewDevice => &["email", "when", "ip", "user_agent"],
            Template::PasswordChanged | Template::SessionReuseDetected => &["email", "when"],
            Template::EmailChanged => &["email", "new_email", "when"],
        }
    }

    fn builtin(self) -> (&'static str, &'static str) {
        macro_rules! files {
            ($name:literal) => {
                (
                    include_str!(concat!("../../templates/email/", $name, ".txt")),
                    include_str!(concat!("../../templates/email/", $name, ".html")),
                )
            };
        }
        match self {
            Template::VerifyEmail => files!("verify_email"),
            Template::ResetPassword => files!("reset_password"),
            Template::ConfirmEmailChange => files!("confirm_email_change"),
            Template::Invitation => files!("invitation"),
            Template::NewDevice => files!("new_device"),
            Template::PasswordChanged => files!("password_changed"),
            Template::EmailChanged => files!("email_changed"),
            Template::SessionReuseDetected => files!("session_reuse_detected"),
        }
    }
}

/// A subject and two bodies, as written.
#[derive(Debug, Clone)]
struct Parts {
    subject: String,
    text: String,
    html: String,
}

/// Every template, loaded and checked.
#[derive(Debug, Clone)]
pub struct Templates {
    parts: HashMap<Template, Parts>,
}

/// A rendered message without its recipient.
#[derive(Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Templates {
    /// The built-in templates, with those `dir` holds instead ("" or `None`: none).
    pub fn load(dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = dir.filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            anyhow::ensure!(
                dir.is_dir(),
                "email.templates_dir {} is not a directory",
                dir.display()
            );
        }
        let mut parts = HashMap::new();
        for template in Template::ALL {
            let (text, html) = template.builtin();
            let read = |ext: &str, builtin: &str| -> anyhow::Result<(String, String)> {
                match dir.map(|d| d.join(format!("{}.{ext}", template.name()))) {
                    Some(path) if path.exists() => Ok((
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?,
                        path.display().to_string(),
                    )),
                    _ => Ok((
                        builtin.to_owned(),
                        format!("built-in {}.{ext}", template.name()),
                    )),
                }
            };
            let (text, text_from) = read("txt", text)?;
            let (html, html_from) = read("html", html)?;
            let (subject, text) = split_subject(&text).with_context(|| text_from.clone())?;
            for (body, from) in [
                (&subject, &text_from),
                (&text, &text_from),
                (&html, &html_from),
            ] {
                check_variables(body, template.variables()).with_context(|| from.clone())?;
            }
            parts.insert(
                template,
                Parts {
                    subject,
                    text,
                    html,
                },
            );
        }
        Ok(Templates { parts })
    }

    /// Renders `template` with `values` (every variable it uses must be given).
    pub fn render(&self, template: Template, values: &[(&str, &str)]) -> Rendered {
        let parts = &self.parts[&template];
        let plain = |s: &str| fill(s, values, |v| v.replace(['\r', '\n'], " "));
        Rendered {
            subject: plain(&parts.subject),
            text: fill(&parts.text, values, str::to_owned),
            html: fill(&parts.html, values, escape_html),
        }
    }
}

/// `Subject: …`, an empty line, the body.
fn split_subject(text: &str) -> anyhow::Result<(String, String)> {
    let text = text.replace("\r\n", "\n");
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let Some(subject) = first.strip_prefix("Subject:") else {
        bail!("the first line of a .txt template must be \"Subject: …\"");
    };
    let subject = subject.trim();
    anyhow::ensure!(!subject.is_empty(), "the subject is empty");
    Ok((subject.to_owned(), rest.trim_start_matches('\n').to_owned()))
}

/// Every `{{name}}` in `body` names one of `allowed`, and every `{{` is closed.
fn check_variables(body: &str, allowed: &[&str]) -> anyhow::Result<()> {
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            bail!("a \"{{{{\" is never closed");
        };
        let name = rest[start + 2..start + 2 + len].trim();
        if !allowed.contains(&name) {
            bail!(
                "unknown value {{{{{name}}}}}; this template may use {}",
                allowed
                    .iter()
                    .map(|v| format!("{{{{{v}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        rest = &rest[start + 2 + len + 2..];
    }
    Ok(())
}

fn fill(body: &str, values: &[(&str, &str)], encode: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(body.len() + 64);
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        // Checked at load: every `{{` is closed and names a known value.
        let len = rest[start + 2..].find("}}").unwrap_or(0);
        let name = rest[start + 2..start + 2 + len].trim();
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v);
        out.push_str(&encode(value));
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

fn escape_html(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-tpl-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn every_builtin_template_loads_and_uses_only_its_values() {
        let templates = Templates::load(None).unwrap();
        for template in Template::ALL {
            let values: Vec<(&str, &str)> =
                template.variables().iter().map(|v| (*v, "VALUE")).collect();
            let r = templates.render(template, &values);
            for part in [&r.subject, &r.text, &r.html] {
                assert!(!part.contains("{{"), "{template:?}: {part}");
            }
            assert!(
                r.text.contains("VALUE") && r.html.contains("VALUE"),
                "{template:?}"
            );
            assert_eq!(Template::from_name(template.name()), Some(template));
        }
    }

    #[test]
    fn values_are_escaped_in_html_only_and_kept_on_one_line_in_the_subject() {
        let templates = Templates::load(None).unwrap();
        let r = templates.render(
            Template::EmailChanged,
            &[
                ("email", "a@x.com"),
                ("new_email", "<b>&\"x\"@y.com"),
                ("when", "now"),
            ],
        );
        assert!(
            r.html.contains("&lt;b&gt;&amp;&quot;x&quot;@y.com"),
            "{}",
            r.html
        );
        assert!(r.text.contains("<b>&\"x\"@y.com"), "{}", r.text);
        let dir = scratch();
        std::fs::write(
            dir.join("password_changed.txt"),
            "Subject: Hi {{email}}\n\nBody",
        )
        .unwrap();
        let r = Templates::load(Some(&dir)).unwrap().render(
            Template::PasswordChanged,
            &[("email", "a\r\nBcc: x@y"), ("when", "")],
        );
        assert_eq!(r.subject, "Hi a  Bcc: x@y");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn an_override_replaces_the_builtin_and_a_bad_one_is_refused_by_name() {
        let dir = scratch();
        std::fs::write(
            dir.join("verify_email.txt"),
            "Subject: Confirm {{ email }}\n\nOpen {{link}} within {{expires_in}}.\n",
        )
        .unwrap();
        let templates = Templates::load(Some(&dir)).unwrap();
        let r = templates.render(
            Template::VerifyEmail,
            &[
                ("email", "a@x.com"),
                ("link", "https://l/?t=1"),
                ("expires_in", "24 hours"),
            ],
        );
        assert_eq!(r.subject, "Confirm a@x.com");
        assert_eq!(r.text, "Open https://l/?t=1 within 24 hours.\n");
        // The HTML body is still the built-in one.
        assert!(r.html.contains("https://l/?t=1"));

        std::fs::write(dir.join("new_device.html"), "<p>{{link}}</p>").unwrap();
        let err = format!("{:#}", Templates::load(Some(&dir)).unwrap_err());
        assert!(
            err.contains("new_device.html") && err.contains("{{link}}"),
            "{err}"
        );
        std::fs::write(dir.join("new_device.html"), "<p>{{ip</p>").unwrap();
        let err = format!("{:#}", Templates::load(Some(&dir)).unwrap_err());
        assert!(err.contains("never closed"), "{err}");
        std::fs::remove_file(dir.join("new_device.html")).unwrap();
        std::fs::write(dir.join("invitation.txt"), "Hello {{link}}").unwrap();
        let err = format!("{:#}", Templates::load(Some(&dir)).unwrap_err());
        assert!(
            err.contains("Subject:") && err.contains("invitation.txt"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
