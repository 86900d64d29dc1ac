//! The `tessera` command line: `serve` (default), `migrate`, `user
//! create|list|show|delete|reset`, `keys`,
//! `backup` and `copy` (the embedded database's backup and its move to PostgreSQL).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::admin::By;
use crate::auth::keys::KeyStore;
use crate::auth::password::PasswordHasherPool;
use crate::auth::session::AuthService;
use crate::config::Settings;
use crate::domain::{Email, Password, UserId};
use crate::error::ApiError;
use crate::startup::Application;
use crate::store::Backend;
use crate::store::Store;
use crate::store::User;
use crate::store::sqlite::SqliteStore;

#[derive(Parser)]
#[command(name = "tessera", version, about = "Token authentication server")]
pub struct Cli {
    /// TOML file layered over the built-in defaults (config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve,
    /// Create the database if needed and apply pending migrations: the schema's, then
    /// the user migrations of users.migrations_dir.
    Migrate {
        /// Apply nothing: print the user migrations that would be applied and what they
        /// would do (each is tried in a transaction that is rolled back).
        #[arg(long)]
        dry_run: bool,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage signing keys in keys.dir.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Write a consistent copy of the embedded (SQLite) database to FILE, while the
    /// server runs.
    Backup {
        /// Where to write the copy (must not exist).
        file: PathBuf,
    },
    /// Copy everything from the embedded database (database.url) into a new PostgreSQL
    /// database, so that the deployment can grow past one instance with every user
    /// still logged in. Stop the server first.
    Copy {
        /// The target, postgres://USER:PASSWORD@HOST:PORT/NAME (created and migrated if
        /// missing; it must hold no user yet). Default: $TESSERA_COPY_TO, which keeps
        /// the password off the command line.
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// The Redis the new deployment will use (default: redis.url, if set): the
        /// live revocation marks are written there, so that a token revoked before
        /// the move stays revoked.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from stdin, or prompted for on a terminal.
    Create {
        #[arg(long)]
        email: String,
        /// A role to grant (repeatable), e.g. --role admin.
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// List users sorted by email, one per line (id, email, verified, roles, disabled,
    /// created, last login).
    List {
        /// Only emails starting with this (case-insensitive).
        #[arg(long)]
        email: Option<String>,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// The next page: users after this email (the last one listed).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one user, as JSON (the admin API's user object).
    Show {
        /// The user's id or email.
        user: String,
    },
    /// Delete a user and everything of theirs (sessions, devices, emailed tokens);
    /// every access token of theirs stops working at once, and the email can register
    /// again. The last enabled admin cannot be deleted.
    Delete {
        /// The user's id or email.
        user: String,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Email the user a password reset link (delivered by the running servers).
    Reset {
        /// The user's id or email.
        user: String,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a signing key if there is no active one for tokens.algorithm.
    Generate,
    /// Publish a new signing key; it signs from keys.publish_ahead_secs from now, when
    /// the old one retires (it keeps verifying until its tokens expire).
    Rotate {
        /// Sign with the new key at once (a leaked key): verifiers refetch the JWKS on
        /// the unknown kid.
        #[arg(long)]
        now: bool,
    },
    /// List keys and their status.
    List,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    crate::startup::use_aws_lc_for_tls();
    let settings = Settings::load(cli.config.as_deref())?;
    crate::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(settings.clone()).await?;
            tracing::info!(address = %format!("{}:{}", settings.server.host, app.port()), "tessera listening");
            app.run_until_signalled().await?;
        }
        Command::Migrate { dry_run } => migrate(settings, dry_run).await?,
        Command::User {
            command: UserCommand::Create { email, roles },
        } => {
            let email = Email::parse(&email).map_err(anyhow::Error::msg)?;
            let roles = if roles.is_empty() {
                vec!["user".to_owned()]
            } else {
                crate::auth::admin::parse_roles(roles)
                    .map_err(|e| anyhow::anyhow!("--role: {e}"))?
            };
            let password = Password::parse_new(read_password()?).map_err(anyhow::Error::msg)?;
            let backend = Backend::from_settings(&settings.database)?;
            backend.prepare(&settings.database, true).await?;
            let store = backend.connect_lazy(&settings.database)?;
            let hasher = PasswordHasherPool::new(&settings.password)?;
            eprintln!("hashing the password ...");
            let hash = hasher
                .hash(password)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let user = store
                .create_user(&email, &hash, &roles, None)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::Conflict => {
                        anyhow::anyhow!("a user with email {} already exists", email.as_str())
                    }
                    other => anyhow::anyhow!("{other}"),
                })?;
            println!("{}", user.id);
            eprintln!(
                "created user {} with roles {}",
                email.as_str(),
                user.roles.join(",")
            );
        }
        Command::User { command } => manage_user(settings, command).await?,
        Command::Backup { file } => backup(&settings, &file).await?,
        Command::Copy { to, redis } => {
            let to = match to.or_else(|| std::env::var("TESSERA_COPY_TO").ok()) {
                Some(to) => to,
                None => anyhow::bail!(
                    "say where to copy to: --to postgres://USER:PASSWORD@HOST:PORT/NAME, \
                     or TESSERA_COPY_TO"
                ),
            };
            copy(&settings, to, redis).await?;
        }
        Command::Keys { command } => {
            let store = KeyStore::from_settings(&settings)?;
            let dir = store.dir().display();
            match command {
                KeysCommand::Generate => match store.ensure_active()? {
                    Some(kid) => println!("created signing key {kid} in {dir}"),
                    None => println!(
                        "an active {} key already exists in {dir}",
                        settings.tokens.algorithm
                    ),
                },
                KeysCommand::Rotate { now } => {
                    let kid = if now {
                        store.rotate_now()?
                    } else {
                        store.rotate()?
                    };
                    let from = store
                        .list()?
                        .into_iter()
                        .find(|k| k.kid == kid)
                        .map(|k| k.active_from.to_rfc3339())
                        .unwrap_or_default();
                    println!(
                        "new signing key {kid} in {dir}, published now, signing from {from}; \
                         running servers whose keys.dir is {dir} pick it up within \
                         keys.reload_secs"
                    );
                }
                KeysCommand::List => {
                    println!("keys.dir: {dir}");
                    println!(
                        "{:<32} {:<6} {:<9} {:<32} {:<32} retires",
                        "kid", "alg", "status", "created", "signs from"
                    );
                    for k in store.list()? {
                        let retired = k
                            .retired_at
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_else(|| "-".into());
                        println!(
                            "{:<32} {:<6} {:<9} {:<32} {:<32} {retired}",
                            k.kid,
                            k.alg,
                            k.status,
                            k.created_at.to_rfc3339(),
                            k.active_from.to_rfc3339()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// `tessera migrate [--dry-run]`: the schema, then the user migrations.
async fn migrate(settings: Settings, dry_run: bool) -> anyhow::Result<()> {
    let backend = Backend::from_settings(&settings.database)?;
    if dry_run {
        backend.prepare(&settings.database, false).await?;
    } else {
        eprintln!("migrating the database schema ...");
        backend.prepare(&settings.database, true).await?;
        eprintln!("the schema is up to date");
    }
    let dir = settings.users.migrations_dir.clone();
    if dir.as_os_str().is_empty() {
        eprintln!("no user migrations (users.migrations_dir is empty)");
        return Ok(());
    }
    let auth = crate::startup::operator_service(settings, !dry_run).await?;
    let verb = if dry_run { "trying" } else { "applying" };
    let done = auth
        .apply_user_migrations(&dir, dry_run, |file| eprintln!("{verb} {file} ..."))
        .await
        .map_err(|e| {
            if dry_run && format!("{e:#}").contains("user_migrations") {
                anyhow::anyhow!(
                    "{e:#}\nthe schema may be behind: run `tessera migrate` (without \
                     --dry-run) to bring it up to date"
                )
            } else {
                e
            }
        })?;
    for outcome in &done {
        let how = if dry_run { "would apply" } else { "applied" };
        println!("{how} {}:", outcome.file);
        for op in &outcome.operations {
            println!("  {op}");
        }
    }
    match (done.len(), dry_run) {
        (0, _) => eprintln!("user migrations are up to date"),
        (n, true) => eprintln!("{n} user migration(s) would be applied; nothing was changed"),
        (n, false) => eprintln!("{n} user migration(s) applied"),
    }
    Ok(())
}

/// `tessera user list|show|delete|reset`, through the same account operations as the
/// admin API (audited as done by an operator).
async fn manage_user(settings: Settings, command: UserCommand) -> anyhow::Result<()> {
    let auth = crate::startup::operator_service(settings, true).await?;
    let failed = |e: ApiError| anyhow::anyhow!("{}", operator_message(e));
    match command {
        UserCommand::Create { .. } => unreachable!("handled by run"),
        UserCommand::List {
            email,
            limit,
            after,
        } => {
            anyhow::ensure!((1..=1000).contains(&limit), "--limit must be 1 to 1000");
            let users = auth
                .admin_list_users(email.as_deref(), after.as_deref(), limit)
                .await
                .map_err(failed)?;
            println!(
                "{:<36}  {:<32}  {:<8}  {:<16}  {:<8}  {:<20}  last login",
                "id", "email", "verified", "roles", "disabled", "created"
            );
            for u in &users {
                let when =
                    |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
                println!(
                    "{:<36}  {:<32}  {:<8}  {:<16}  {:<8}  {:<20}  {}",
                    u.id,
                    u.email.as_deref().unwrap_or("-"),
                    u.email_verified,
                    u.roles.join(","),
                    u.disabled,
                    when(u.created_at),
                    u.last_login_at.map(when).unwrap_or_else(|| "-".into())
                );
            }
            if users.len() as i64 == limit
                && let Some(last) = users.last()
            {
                eprintln!("more may follow: --after {}", shown(last));
            }
        }
        UserCommand::Show { user } => {
            let user = find_user(&auth, &user).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::http::UserView::from(user))?
            );
        }
        UserCommand::Delete { user, yes } => {
            let user = find_user(&auth, &user).await?;
            if !yes {
                anyhow::ensure!(
                    std::io::stdin().is_terminal(),
                    "say --yes to delete {} without a terminal to confirm on",
                    shown(&user)
                );
                eprint!(
                    "delete {} ({}) and everything of theirs? [y/N] ",
                    shown(&user),
                    user.id
                );
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                anyhow::ensure!(answer.trim().eq_ignore_ascii_case("y"), "nothing deleted");
            }
            auth.delete_user(user.id, By::Operator)
                .await
                .map_err(failed)?;
            eprintln!("deleted user {} ({})", shown(&user), user.id);
        }
        UserCommand::Reset { user } => {
            anyhow::ensure!(
                auth.settings().email.transport != crate::config::EmailTransport::None,
                "email.transport is \"none\": nothing would be sent; set email.transport \
                 (and email.smtp_url) as the servers have them"
            );
            let user = find_user(&auth, &user).await?;
            auth.send_reset(user.id, By::Operator)
                .await
                .map_err(failed)?;
            eprintln!(
                "a password reset link for {} is in the outbox; a running server sends it",
                shown(&user)
            );
        }
    }
    Ok(())
}

/// How a user is named in messages: the email, or "anonymous user".
fn shown(user: &User) -> &str {
    user.email.as_deref().unwrap_or("anonymous user")
}

/// A user named by id or by email.
async fn find_user(auth: &AuthService, name: &str) -> anyhow::Result<User> {
    let found = match uuid::Uuid::parse_str(name) {
        Ok(id) => auth.find_user(UserId(id)).await,
        Err(_) => {
            let email = Email::parse(name)
                .map_err(|e| anyhow::anyhow!("{name:?} is neither a user id nor an email: {e}"))?;
            auth.find_user_by_email(&email).await
        }
    };
    found
        .map_err(|e| anyhow::anyhow!("{}", operator_message(e)))?
        .ok_or_else(|| anyhow::anyhow!("no user {name}; `tessera user list` shows them"))
}

/// What the operator is told when an account operation fails.
fn operator_message(e: ApiError) -> String {
    match e {
        ApiError::LastAdmin => {
            "this is the last enabled admin; make another user admin first".into()
        }
        ApiError::NotFound => "no such user (deleted meanwhile?)".into(),
        ApiError::Unavailable(e, _) => {
            format!("a backing service is unavailable: {e:#}; check database.url and redis.url")
        }
        other => format!("{other}"),
    }
}

fn read_password() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ")?;
        let second = rpassword::prompt_password("again: ")?;
        anyhow::ensure!(first == second, "the passwords do not match");
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        // Only the line ending is removed: the password is kept exactly as typed.
        Ok(line
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(&line)
            .to_owned())
    }
}

/// The embedded store of `settings`, for `backup` and `copy`: it must exist.
async fn embedded_store(settings: &Settings, what: &str) -> anyhow::Result<SqliteStore> {
    if Backend::from_settings(&settings.database)? != Backend::Sqlite {
        anyhow::bail!(
            "{what} works on the embedded database, and database.url is not sqlite://...; \
             for PostgreSQL use its own tools (pg_dump)"
        );
    }
    let store = SqliteStore::connect_lazy(&settings.database)?;
    if !store.file().is_file() {
        anyhow::bail!(
            "there is no database at {}; is database.url (TESSERA__DATABASE__URL) right, \
             and is this the directory the server runs in?",
            store.file().display()
        );
    }
    Ok(store)
}

async fn backup(settings: &Settings, file: &std::path::Path) -> anyhow::Result<()> {
    let store = embedded_store(settings, "backup").await?;
    if file.exists() {
        anyhow::bail!("{} exists; give a new file name", file.display());
    }
    eprintln!(
        "copying {} to {} (the server may keep running) ...",
        store.file().display(),
        file.display()
    );
    store.backup(file).await?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "backup written: {} ({} KiB); restore by stopping the server and putting it in \
         place of {}",
        file.display(),
        size / 1024,
        store.file().display()
    );
    Ok(())
}

async fn copy(settings: &Settings, to: String, redis: Option<String>) -> anyhow::Result<()> {
    use crate::store::postgres::PgStore;
    use secrecy::ExposeSecret;

    let source = embedded_store(settings, "copy").await?;
    // The same migrations as `serve`, so both sides have the current schema.
    SqliteStore::prepare(&settings.database, true).await?;
    if !source.claim_single_instance().await? {
        anyhow::bail!(
            "a Tessera server is running on {}: stop it first, or what it writes after the \
             copy (a refresh, a logout) would not reach PostgreSQL",
            source.file().display()
        );
    }
    if Backend::of(&to)? != Backend::Postgres {
        anyhow::bail!("--to must be a postgres:// URL");
    }
    let mut target = settings.database.clone();
    target.url = to.into();
    eprintln!("preparing the PostgreSQL database (create if missing, migrate) ...");
    PgStore::prepare(&target, true).await?;
    let pg = PgStore::connect_lazy(&target)?;
    eprintln!("copying from {} ...", source.file().display());
    let copied = crate::store::copy::sqlite_to_postgres(&source, &pg, |table, done, total| {
        eprintln!("  {table}: {done}/{total}");
    })
    .await?;
    eprintln!(
        "copied {} users, {} sessions, {} refresh tokens, {} devices, {} audit events, {} \
         emailed tokens, {} outbox messages, {} saved revocation marks, {} applied user \
         migrations, {} second factors with {} recovery codes",
        copied.users,
        copied.sessions,
        copied.refresh_tokens,
        copied.devices,
        copied.audit_events,
        copied.email_tokens,
        copied.outbox,
        copied.revocation_marks,
        copied.user_migrations,
        copied.mfa_totp,
        copied.mfa_recovery_codes
    );
    let redis = redis.or_else(|| {
        let url = settings.redis.url.expose_secret().trim().to_owned();
        (!url.is_empty()).then_some(url)
    });
    let horizon = settings.tokens.access_token_horizon().as_secs() as i64;
    match redis {
        Some(url) => {
            let mut redis_settings = settings.redis.clone();
            redis_settings.url = url.into();
            let denylist = crate::store::redis::Denylist::connect_lazy(&redis_settings)?;
            let marks = crate::store::copy::copy_marks(&source, &denylist, horizon)
                .await
                .context("writing the revocation marks to Redis")?;
            eprintln!(
                "{marks} live revocation marks written to Redis (key prefix {:?})",
                redis_settings.key_prefix
            );
        }
        None => eprintln!(
            "no Redis given (--redis): the revocation marks went to PostgreSQL only, which \
             a single instance with an empty redis.url reads; give --redis URL before \
             running several instances on Redis, or wait {horizon} s (the longest an \
             access token lives) before switching"
        ),
    }
    eprintln!(
        "done: start Tessera with database.url (TESSERA__DATABASE__URL) set to the new \
         database and redis.url for more than one instance; keep {} as a backup",
        source.file().display()
    );
    Ok(())
}
