//! User migrations (`users.migrations_dir`): operators manage users the way they manage
//! the schema. Each file `NNNN_name.toml` is a list of operations:
//!
//! ```toml
//! [[operation]]
//! op = "create"                        # with an argon2 PHC hash
//! email = "ops@example.com"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$...$..."
//! roles = ["admin", "user"]            # default ["user"]
//!
//! [[operation]]
//! op = "invite"                        # a reset link is emailed (email.invite_ttl_secs)
//! email = "new@example.com"
//!
//! [[operation]]
//! op = "grant"                         # or "revoke"
//! email = "ops@example.com"
//! role = "auditor"
//!
//! [[operation]]
//! op = "disable"                       # or "delete"
//! email = "old@example.com"
//! ```
//!
//! `tessera migrate` applies the files not applied yet, after the schema migrations, in
//! the order of their numbers, each once and each in one transaction: an operation that
//! fails (a user that exists already or does not exist, the last enabled admin) rolls
//! its whole file back, names the file and the operation, and stops. Forward-only, like
//! sqlx's schema migrations: each applied file is recorded (`user_migrations`) with the
//! SHA-256 of its bytes, and an applied file that was edited or removed afterwards, or a
//! new file numbered below an applied one, is an error that names it. `--dry-run` does
//! everything in a transaction that is rolled back, and prints what would change.
//!
//! What an applied file changes counts like an admin's change: role changes, disabling
//! and deleting revoke the user's access tokens at once (one per-user mark), disabling
//! ends their sessions, and each applied file writes a `user_migration_applied` audit
//! row (never an address: the file is where the addresses are).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::admin::parse_roles;
use super::password::is_argon2_hash;
use super::session::AuthService;
use crate::config::EmailTransport;
use crate::domain::{Email, Password, sha256};
use crate::email::templates::Template;
use crate::error::ApiError;
use crate::store::{
    AuditKind, EmailTokenKind, Invitation, StoreError, UserMigrationRecord, UserOp,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContent {
    #[serde(rename = "operation", default)]
    operations: Vec<Operation>,
}

/// One operation as written in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Operation {
    Create {
        email: String,
        password_hash: String,
        #[serde(default = "default_roles")]
        roles: Vec<String>,
    },
    Invite {
        email: String,
        #[serde(default = "default_roles")]
        roles: Vec<String>,
    },
    Grant {
        email: String,
        role: String,
    },
    Revoke {
        email: String,
        role: String,
    },
    Disable {
        email: String,
    },
    Delete {
        email: String,
    },
}

fn default_roles() -> Vec<String> {
    vec!["user".to_owned()]
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Create { email, roles, .. } => {
                write!(f, "create {email} (roles {})", roles.join(","))
            }
            Operation::Invite { email, roles } => {
                write!(f, "invite {email} (roles {})", roles.join(","))
            }
            Operation::Grant { email, role } => write!(f, "grant {role} to {email}"),
            Operation::Revoke { email, role } => write!(f, "revoke {role} from {email}"),
            Operation::Disable { email } => write!(f, "disable {email}"),
            Operation::Delete { email } => write!(f, "delete {email}"),
        }
    }
}

/// One file of the directory, read and parsed.
#[derive(Debug, Clone)]
pub struct MigrationFile {
    pub version: i64,
    pub name: String,
    pub path: PathBuf,
    checksum: Vec<u8>,
    operations: Vec<Operation>,
}

impl MigrationFile {
    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn record(&self) -> UserMigrationRecord {
        UserMigrationRecord {
            version: self.version,
            name: self.name.clone(),
            checksum: self.checksum.clone(),
        }
    }
}

/// Reads every `NNNN_name.toml` of `dir`, sorted by number. Other `.toml` names, two
/// files with one number and files that do not parse are errors naming the file.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<MigrationFile>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot read users.migrations_dir {}: {e}; is the path right \
             (relative paths are from the working directory)?",
            dir.display()
        )
    })?;
    let mut files: BTreeMap<i64, MigrationFile> = BTreeMap::new();
    for entry in entries {
        let path = entry?.path();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(stem) = file_name.strip_suffix(".toml") else {
            continue; // a README, say
        };
        let parsed = stem.split_once('_').and_then(|(number, name)| {
            let well_formed = !number.is_empty()
                && number.bytes().all(|b| b.is_ascii_digit())
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            well_formed
                .then(|| number.parse::<i64>().ok().map(|n| (n, name.to_owned())))
                .flatten()
        });
        let Some((version, name)) = parsed else {
            anyhow::bail!(
                "{}: a user migration is named NNNN_name.toml (digits, an underscore, then \
                 letters, digits, _ or -)",
                path.display()
            );
        };
        let bytes = std::fs::read(&path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| anyhow::anyhow!("{}: not UTF-8", path.display()))?;
        let content: FileContent = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid user migration: {e}", path.display()))?;
        let file = MigrationFile {
            version,
            name,
            checksum: sha256(&bytes).to_vec(),
            operations: content.operations,
            path,
        };
        if let Some(other) = files.insert(version, file) {
            anyhow::bail!(
                "{} and {} have the same number {version}; renumber one",
                other.path.display(),
                files[&version].path.display()
            );
        }
    }
    Ok(files.into_values().collect())
}

/// The files not applied yet, in order, after checking the applied ones are all there
/// and unchanged and no new one is numbered below an applied one.
pub fn pending(
    files: &[MigrationFile],
    applied: &[UserMigrationRecord],
) -> anyhow::Result<Vec<MigrationFile>> {
    for record in applied {
        match files.iter().find(|f| f.version == record.version) {
            None => anyhow::bail!(
                "user migration {} ({}) was applied but its file is gone from \
                 users.migrations_dir; user migrations are forward-only: restore the file",
                record.version,
                record.name
            ),
            Some(file) if file.checksum != record.checksum => anyhow::bail!(
                "{} was edited after it was applied (its checksum differs); user \
                 migrations are forward-only: undo the edit and make the change in a new \
                 file",
                file.path.display()
            ),
            Some(_) => {}
        }
    }
    let last = applied.iter().map(|r| r.version).max();
    let pending: Vec<MigrationFile> = files
        .iter()
        .filter(|f| !applied.iter().any(|r| r.version == f.version))
        .cloned()
        .collect();
    if let (Some(last), Some(early)) = (last, pending.iter().find(|f| Some(f.version) < last)) {
        anyhow::bail!(
            "{} is numbered below user migration {last}, which is applied already; \
             give it a number above {last}",
            early.path.display()
        );
    }
    Ok(pending)
}

/// What `tessera migrate` did, or with `--dry-run` would do, with one file.
pub struct Outcome {
    pub file: String,
    pub operations: Vec<String>,
}

impl AuthService {
    /// Applies (or with `dry_run` tries and rolls back) the pending user migrations of
    /// `dir`, in order; stops at the first file that fails, with an error naming it and
    /// its operation. `progress` is told of each file before it is applied.
    pub async fn apply_user_migrations(
        &self,
        dir: &Path,
        dry_run: bool,
        mut progress: impl FnMut(&str),
    ) -> anyhow::Result<Vec<Outcome>> {
        let files = read_dir(dir)?;
        let applied = self
            .store
            .applied_user_migrations()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the applied user migrations: {e}"))?;
        let mut done = Vec::new();
        for file in pending(&files, &applied)? {
            let name = file.file_name();
            progress(&name);
            let ops = self.resolve(&file).await?;
            let effects = match self
                .store
                .apply_user_migration(&file.record(), &ops, dry_run)
                .await
            {
                Ok(Ok(effects)) => effects,
                Ok(Err(failure)) => anyhow::bail!(
                    "{}, operation {} ({}): {}; nothing of this file was applied",
                    file.path.display(),
                    failure.operation,
                    file.operations[failure.operation - 1],
                    failure.reason
                ),
                Err(StoreError::Conflict) => anyhow::bail!(
                    "{} was applied by another `tessera migrate` meanwhile; run it again",
                    file.path.display()
                ),
                Err(e) => anyhow::bail!("{}: {e}", file.path.display()),
            };
            if !dry_run {
                self.deny_sessions(&effects.ended)
                    .await
                    .map_err(unavailable)?;
                for user in &effects.users {
                    self.forget_email(*user);
                    self.revoke_user_tokens(*user).await.map_err(unavailable)?;
                }
                if ops.iter().any(|op| {
                    matches!(
                        op,
                        UserOp::Create {
                            invitation: Some(_),
                            ..
                        }
                    )
                }) {
                    self.outbox.wake();
                }
                self.record(crate::store::AuditEvent {
                    kind: AuditKind::UserMigrationApplied,
                    user_id: None,
                    session_id: None,
                    actor_id: None,
                    client: &Default::default(),
                    detail: json!({
                        "version": file.version,
                        "name": file.name,
                        "operations": ops.len(),
                    }),
                })
                .await;
            }
            done.push(Outcome {
                file: name,
                operations: file.operations.iter().map(ToString::to_string).collect(),
            });
        }
        Ok(done)
    }

    /// A file's operations checked (addresses, roles, hashes) and made ready for the
    /// store; an invitation's link is made here and written with its user.
    async fn resolve(&self, file: &MigrationFile) -> anyhow::Result<Vec<UserOp>> {
        let at = |i: usize, what: String| {
            anyhow::anyhow!(
                "{}, operation {} ({}): {what}",
                file.path.display(),
                i + 1,
                file.operations[i]
            )
        };
        let email = |i: usize, raw: &str| Email::parse(raw).map_err(|e| at(i, e.to_string()));
        let roles = |i: usize, raw: &[String]| {
            parse_roles(raw.to_vec()).map_err(|e| at(i, format!("roles: {e}")))
        };
        let role = |i: usize, raw: &str| {
            parse_roles(vec![raw.to_owned()])
                .map(|mut r| r.remove(0))
                .map_err(|e| at(i, format!("role: {e}")))
        };
        let mut ops = Vec::with_capacity(file.operations.len());
        for (i, op) in file.operations.iter().enumerate() {
            ops.push(match op {
                Operation::Create {
                    email: e,
                    password_hash,
                    roles: r,
                } => {
                    if !is_argon2_hash(password_hash) {
                        return Err(at(
                            i,
                            "password_hash must be an argon2 PHC string \
                                 ($argon2id$v=19$m=...,t=...,p=...$salt$hash)"
                                .into(),
                        ));
                    }
                    UserOp::Create {
                        email: email(i, e)?,
                        password_hash: password_hash.clone(),
                        roles: roles(i, r)?,
                        invitation: None,
                    }
                }
                Operation::Invite { email: e, roles: r } => {
                    if self.settings().email.transport == EmailTransport::None {
                        return Err(at(
                            i,
                            "an invitation is emailed, and email.transport is \"none\"; \
                                 set email.transport as the servers have it"
                                .into(),
                        ));
                    }
                    let address = email(i, e)?;
                    // A real hash of a password nobody knows, like an admin's
                    // invitation: a login attempt costs what any other does.
                    let unknown = Password::parse_new(
                        crate::auth::refresh_token::RefreshToken::generate()
                            .expose()
                            .to_owned(),
                    )
                    .map_err(|e| at(i, format!("random password: {e}")))?;
                    let password_hash = self
                        .hasher
                        .hash(unknown)
                        .await
                        .map_err(|e| at(i, format!("hashing: {e}")))?;
                    let link = self.issue_link(
                        EmailTokenKind::ResetPassword,
                        Template::Invitation,
                        None,
                        &address,
                        self.settings().email.invite_ttl_secs,
                    );
                    UserOp::Create {
                        email: address,
                        password_hash,
                        roles: roles(i, r)?,
                        invitation: Some(Invitation {
                            token_hash: link.hash,
                            expires_at: link.expires_at,
                            message: link.message,
                        }),
                    }
                }
                Operation::Grant { email: e, role: r } => UserOp::Grant {
                    email: email(i, e)?,
                    role: role(i, r)?,
                },
                Operation::Revoke { email: e, role: r } => UserOp::Revoke {
                    email: email(i, e)?,
                    role: role(i, r)?,
                },
                Operation::Disable { email: e } => UserOp::Disable {
                    email: email(i, e)?,
                },
                Operation::Delete { email: e } => UserOp::Delete {
                    email: email(i, e)?,
                },
            });
        }
        Ok(ops)
    }
}

fn unavailable(e: ApiError) -> anyhow::Error {
    anyhow::anyhow!(
        "the file is applied, but revoking the access tokens of the users it changed \
         failed ({e}); they expire within tokens.access_ttl_secs, or end them at once \
         with DELETE /admin/users/{{id}}/sessions once redis.url answers again"
    )
}
