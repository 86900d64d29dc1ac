//! `Application::build(settings)`: wires the store, denylist, keys, hashing pool and
//! HTTP routes into a bound server. Nothing is global, so tests build the very same
//! application on port 0, several times in one process.

use std::net::TcpListener;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix_cors::Cors;
use actix_web::dev::{Server, Service, ServiceResponse};
use actix_web::http::{StatusCode, header};
use actix_web::middleware::{DefaultHeaders, ErrorHandlerResponse, ErrorHandlers};
use actix_web::{App, HttpMessage, HttpResponse, HttpServer, ResponseError, web};
use anyhow::Context;
use tracing::Instrument;

use crate::auth::access_token::AccessTokens;
use crate::auth::keys::{KeyStore, SharedKeyring};
use crate::auth::password::PasswordHasherPool;
use crate::auth::session::{AuthService, Sealing};
use crate::config::{EmailTransport, Settings};
use crate::email::Mailer;
use crate::email::templates::Templates;
use crate::error::ApiError;
use crate::http::cookies::BrowserSessions;
use crate::http::extract::{IpRange, RequestId};
use crate::http::token::IntrospectionClients;
use crate::http::{admin, auth, email, health, mfa, openapi, sessions, token, users, well_known};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::outbox::sender::Sender;
use crate::outbox::webhook::Webhooks;
use crate::store::memory::{MemoryBudgets, MemoryMarks};
use crate::store::redis::{Denylist, LoginFailures};
use crate::store::{Backend, FailureBudgets, MarksHealth, Revocations, Store};
use secrecy::ExposeSecret;

pub use crate::http::AppState;

/// Reads the saved revocation marks back, now if the database allows (tables missing
/// while `tessera migrate` has not run yet, say), else every second until it does;
/// token checks answer 503 until then.
async fn spawn_mark_loading(marks: Weak<MemoryMarks>, session_mark_secs: u64) {
    let attempt = move |marks: Arc<MemoryMarks>| async move {
        match marks.load(session_mark_secs).await {
            Ok(loaded) => {
                tracing::info!(loaded, "revocation marks read back from the database");
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot read the revocation marks back yet; token checks answer 503 \
                     until the database allows it (retrying every second)"
                );
                false
            }
        }
    };
    if let Some(m) = marks.upgrade()
        && attempt(m).await
    {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(m) = marks.upgrade() else { return };
            if attempt(m).await {
                return;
            }
        }
    });
}

/// Every second, applies the marks other processes saved in the database (the command
/// line's: see [`operator_service`]).
fn spawn_mark_sync(marks: Weak<MemoryMarks>) {
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(MARK_SYNC_EVERY).await;
            let Some(m) = marks.upgrade() else { return };
            match m.sync().await {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %format!("{e:#}"), "cannot read saved revocation marks");
                }
                Err(_) => {}
            }
        }
    });
}

/// How often a single instance reads the marks other processes saved.
const MARK_SYNC_EVERY: Duration = Duration::from_secs(1);

/// The account operations for the command line (`tessera user list|show|delete|reset`):
/// the store, revocations and outbox a server with these settings uses, without
/// serving. With `redis.url` empty a revocation is saved in the database, where the
/// running server applies it within a second ([`MemoryMarks::sync`]); with Redis it is
/// written there, as a server would. Email is left in the outbox for the servers'
/// senders.
pub async fn operator_service(settings: Settings, migrate: bool) -> anyhow::Result<AuthService> {
    use_aws_lc_for_tls();
    let backend = Backend::from_settings(&settings.database)?;
    backend.prepare(&settings.database, migrate).await?;
    let store = backend.connect_lazy(&settings.database)?;
    let revocations: Arc<dyn Revocations> = if settings.redis.url.expose_secret().trim().is_empty()
    {
        Arc::new(MemoryMarks::persistent(store.clone()))
    } else {
        Arc::new(Denylist::connect_lazy(&settings.redis)?)
    };
    let failures = Arc::new(MemoryBudgets::new(&settings.login));
    let secrets = KeyStore::from_settings(&settings)?;
    let outbox = Arc::new(Outbox::new(&secrets.outbox_secret()?));
    let mfa_secret = secrets.mfa_secret()?;
    let keys = Arc::new(SharedKeyring::open(secrets)?);
    let tokens = AccessTokens::new(keys, &settings.tokens);
    let hasher = PasswordHasherPool::new(&settings.password)?;
    let webhooks = Arc::new(Webhooks::from_settings(&settings.events)?);
    Ok(AuthService::new(
        settings,
        store,
        revocations,
        failures,
        tokens,
        hasher,
        Sealing::new(outbox, &mfa_secret),
    )
    .with_webhooks(webhooks))
}

/// Where revocation marks and login failure budgets live: Redis, shared by every
/// instance, or (with `redis.url` empty) this process alone, its marks made durable
/// through the database.
async fn revocations_and_budgets(
    settings: &Settings,
    store: &Arc<dyn Store>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<dyn Revocations>, Arc<dyn FailureBudgets>)> {
    if settings.redis.url.expose_secret().trim().is_empty() {
        if !store.claim_single_instance().await? {
            anyhow::bail!(
                "another Tessera instance with an empty redis.url is running on this \
                 database: revocations kept in process cannot be shared, so only one may \
                 run; stop it, or give every instance the same redis.url (and a \
                 postgres:// database.url)"
            );
        }
        let marks = Arc::new(MemoryMarks::persistent(store.clone()));
        let session_mark_secs = settings.tokens.access_token_horizon().as_secs();
        match Backend::from_settings(&settings.database)? {
            Backend::Sqlite => tracing::info!(
                database = %settings.database.url.expose_secret(),
                "single-instance mode: embedded SQLite database, revocation marks and \
                 login failure budgets in this process; to run more than one instance, \
                 move the data with `tessera copy --to postgres://...`, then set \
                 database.url to it and redis.url"
            ),
            Backend::Postgres => tracing::info!(
                "single-instance mode: revocation marks and login failure budgets are \
                 kept in this process (redis.url is empty); set redis.url to run more \
                 than one instance"
            ),
        }
        spawn_mark_loading(Arc::downgrade(&marks), session_mark_secs).await;
        spawn_mark_sync(Arc::downgrade(&marks));
        return Ok((marks, Arc::new(MemoryBudgets::new(&settings.login))));
    }
    let mut denylist = Denylist::connect_lazy(&settings.redis)?;
    denylist.measured(metrics.clone());
    denylist.check_at_start().await?;
    if settings.redis.local_copy {
        denylist.follow(&settings.redis)?;
    }
    let failures = Arc::new(LoginFailures::new(
        denylist.connection(),
        denylist.prefix(),
        &settings.login,
    ));
    Ok((Arc::new(denylist), failures))
}

/// Makes aws-lc-rs the process's rustls provider (Redis's TLS takes the process
/// default; more than one provider is linked in, so none would be picked by itself).
pub fn use_aws_lc_for_tls() {
    // An error means one is installed already: this one, by an earlier call.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    shutdown_delay: Duration,
    /// The metrics listener's server and port, when `metrics.listen` is set.
    metrics: Option<(Server, u16)>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        use_aws_lc_for_tls();
        let backend = Backend::from_settings(&settings.database)?;
        backend
            .prepare(&settings.database, settings.database.auto_migrate)
            .await?;
        let store = backend.connect_lazy(&settings.database)?;
        let metrics = Arc::new(Metrics::new());
        let (revocations, failures) = revocations_and_budgets(&settings, &store, &metrics).await?;
        let keys = Arc::new(SharedKeyring::open(KeyStore::from_settings(&settings)?)?);
        let k = &settings.keys;
        if k.publish_ahead_secs < k.jwks_max_age_secs + k.reload_secs {
            tracing::warn!(
                publish_ahead_secs = k.publish_ahead_secs,
                "keys.publish_ahead_secs is below keys.jwks_max_age_secs + keys.reload_secs: \
                 after a rotation a verifier with a cached JWKS may meet the new kid before \
                 it refetches"
            );
        }
        let rotate_every =
            (k.rotate_every_days > 0).then(|| Duration::from_secs(k.rotate_every_days * 86_400));
        let tokens = AccessTokens::new(keys.clone(), &settings.tokens)
            .remembering(settings.cache.verified_tokens);
        let hasher = PasswordHasherPool::new(&settings.password)?.measured(metrics.clone());
        let trusted_proxies = settings
            .server
            .trusted_proxies
            .iter()
            .map(|p| IpRange::parse(p))
            .collect::<anyhow::Result<_>>()?;
        let introspection_clients = IntrospectionClients::from_settings(
            &settings.introspection,
            settings.login.max_tracked_keys,
        )?;
        let secrets = KeyStore::from_settings(&settings)?;
        let browser = BrowserSessions::new(&settings, &secrets.csrf_secret()?);
        let outbox = Arc::new(Outbox::new(&secrets.outbox_secret()?));
        let mailer = Mailer::from_settings(&settings.email)?;
        let templates = Templates::load(Some(&settings.email.templates_dir))?;
        if settings.email.transport == EmailTransport::Log {
            tracing::warn!(
                "email.transport = \"log\": emails, links included, go to this log and \
                 nowhere else; for development only"
            );
        }
        if !settings.cookies.secure {
            tracing::warn!(
                "cookies.secure = false: browser sessions' cookies are sent over plain \
                 HTTP and lose their __Host- prefix; for local development only"
            );
        }

        let address = settings.listen_address();
        let listener = TcpListener::bind(&address).with_context(|| {
            format!("cannot listen on {address}; is another server running there?")
        })?;
        let port = listener.local_addr()?.port();
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let reload_every = Duration::from_secs(settings.keys.reload_secs.max(1));
        let cors_origins = settings.server.cors_allowed_origins.clone();
        let cleanup_every = Duration::from_secs(settings.cleanup.interval_secs);
        let shutdown_timeout_secs = settings.server.shutdown_timeout_secs;
        let shutdown_delay = Duration::from_secs(settings.server.shutdown_delay_secs);
        let metrics_listener = match settings.metrics.listen.trim() {
            "" => None,
            address => Some(TcpListener::bind(address).with_context(|| {
                format!(
                    "cannot listen for metrics on {address}; set metrics.listen \
                     (TESSERA__METRICS__LISTEN) to a free address, or to \"\" for none"
                )
            })?),
        };

        let webhooks = Arc::new(Webhooks::from_settings(&settings.events)?);
        let sender = Sender::new(
            &store,
            outbox.clone(),
            mailer,
            templates,
            settings.email.clone(),
            webhooks.clone(),
        );
        let mfa_secret = secrets.mfa_secret()?;
        let auth = AuthService::new(
            settings,
            store,
            revocations,
            failures,
            tokens,
            hasher,
            Sealing::new(outbox, &mfa_secret),
        )
        .with_metrics(metrics.clone())
        .with_webhooks(webhooks);
        let state = web::Data::new(AppState {
            auth,
            trusted_proxies,
            introspection_clients,
            browser,
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        let app_state = state.clone();
        let activity = state.auth.hasher.activity();
        let proxies = state.trusted_proxies.clone();
        let server =
            HttpServer::new(move || {
                let activity = activity.clone();
                let proxies = proxies.clone();
                let metrics = metrics.clone();
                App::new()
                .app_data(app_state.clone())
                .configure(routes)
                .default_service(web::to(|| async { ApiError::NotFound.error_response() }))
                .wrap(cors(&cors_origins))
                .wrap(DefaultHeaders::new().add((header::X_CONTENT_TYPE_OPTIONS, "nosniff")))
                .wrap(ErrorHandlers::new().default_handler(contract_error_body))
                .wrap_fn(move |req, srv| {
                    // Every request but the password checks tells the hashing pool that
                    // the server is busy (see `auth::password::Activity`).
                    let hashing = matches!(
                        (req.method().as_str(), req.path()),
                        ("POST", "/login")
                            | ("POST", "/users")
                            | ("PUT", "/me/password")
                            | ("PUT", "/me/email")
                            | ("DELETE", "/me")
                            | ("DELETE", "/me/mfa/totp")
                            | ("POST", "/me/reauthenticate")
                            | ("POST", "/password/reset")
                    );
                    let busy = (!hashing).then(|| activity.enter());
                    let request_id = RequestId::of(
                        req.peer_addr().map(|a| a.ip()),
                        req.headers().get("x-request-id"),
                        &proxies,
                    );
                    req.extensions_mut().insert(request_id.clone());
                    let request_id = request_id.0;
                    let path: String = req.path().chars().take(200).collect();
                    let span =
                        tracing::info_span!("request", %request_id, method = %req.method(), %path);
                    let started = Instant::now();
                    let fut = srv.call(req);
                    let metrics = metrics.clone();
                    async move {
                        let res = fut.await;
                        drop(busy);
                        let mut res = res?;
                        let elapsed = started.elapsed();
                        tracing::info!(
                            status = res.status().as_u16(),
                            elapsed_us = elapsed.as_micros() as u64,
                            "request"
                        );
                        metrics.request(
                            res.request().match_pattern().as_deref().unwrap_or("unmatched"),
                            res.request().method().as_str(),
                            res.status().as_u16(),
                            elapsed,
                        );
                        if let Ok(v) = header::HeaderValue::from_str(&request_id) {
                            res.headers_mut()
                                .insert(header::HeaderName::from_static("x-request-id"), v);
                        }
                        Ok(res)
                    }
                    .instrument(span)
                })
            })
            .workers(workers)
            // SIGTERM and Ctrl-C are ours (see `run_until_stopped`): readiness first.
            .disable_signals()
            .shutdown_timeout(shutdown_timeout_secs)
            .listen(listener)?
            .run();

        spawn_periodic(Arc::downgrade(&keys), reload_every, move |k| {
            if let Some(every) = rotate_every {
                k.rotate_if_due(every);
            }
            k.reload()
        });
        let shared = state.clone().into_inner();
        spawn_periodic(Arc::downgrade(&shared), Duration::from_secs(60), |s| {
            s.auth.throttle.purge()
        });
        spawn_cleanup(Arc::downgrade(&shared), cleanup_every);
        tokio::spawn(sender.run());
        spawn_eviction_check(Arc::downgrade(&shared));
        let metrics_server = match metrics_listener {
            Some(listener) => {
                let metrics_port = listener.local_addr()?.port();
                tracing::info!(address = %listener.local_addr()?, "metrics at /metrics");
                spawn_acquire_probe(Arc::downgrade(&shared));
                let state = state.clone();
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(state.clone())
                        .route("/metrics", web::get().to(crate::http::metrics::scrape))
                })
                .workers(1)
                .disable_signals()
                .shutdown_timeout(1)
                .listen(listener)?
                .run();
                Some((server, metrics_port))
            }
            None => None,
        };
        Ok(Application {
            port,
            server,
            state,
            shutdown_delay,
            metrics: metrics_server,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The metrics listener's port, when there is one.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(_, port)| *port)
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Stops the server from outside (tests that restart an instance).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped through [`Application::handle`] (tests).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let metrics = self.metrics.map(start_metrics);
        let stopped = self.server.await;
        stop_metrics(metrics).await;
        stopped
    }

    /// `tessera serve`: serves until SIGTERM or Ctrl-C, then readiness turns 503 at
    /// once, requests are still served for `server.shutdown_delay_secs` (a load balancer
    /// notices and sends no more), the listener closes, and requests in flight get
    /// `server.shutdown_timeout_secs` to finish.
    pub async fn run_until_signalled(self) -> std::io::Result<()> {
        let Application {
            server,
            state,
            shutdown_delay,
            metrics,
            ..
        } = self;
        let metrics = metrics.map(start_metrics);
        let handle = server.handle();
        tokio::pin!(server);
        tokio::select! {
            stopped = &mut server => return stopped,
            signal = shutdown_signal() => signal?,
        }
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            delay_secs = shutdown_delay.as_secs(),
            "shutting down: readiness is 503; still serving for the delay"
        );
        tokio::select! {
            stopped = &mut server => return stopped,
            () = tokio::time::sleep(shutdown_delay) => {}
        }
        tracing::info!("shutting down: listener closed, finishing requests in flight");
        // The server future handles the stop command: poll both.
        let ((), stopped) = tokio::join!(handle.stop(true), server);
        stop_metrics(metrics).await;
        tracing::info!("stopped");
        stopped
    }
}

/// Serves the metrics listener beside the API.
fn start_metrics(
    (server, _): (Server, u16),
) -> (
    tokio::task::JoinHandle<std::io::Result<()>>,
    actix_web::dev::ServerHandle,
) {
    let handle = server.handle();
    (tokio::spawn(server), handle)
}

/// Stops the metrics listener once the API has stopped (scrapes are answered to the
/// end of a drain).
async fn stop_metrics(
    metrics: Option<(
        tokio::task::JoinHandle<std::io::Result<()>>,
        actix_web::dev::ServerHandle,
    )>,
) {
    if let Some((task, handle)) = metrics {
        let _ = tokio::join!(handle.stop(false), task);
    }
}

/// Once a second, takes a database connection as a request would and records how long
/// that took (`tessera_db_acquire_seconds`); only while metrics are served.
fn spawn_acquire_probe(target: Weak<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(state) = target.upgrade() else {
                return;
            };
            if let Ok(took) = state.auth.store.probe_acquire().await {
                state.auth.metrics.acquired(took);
            }
        }
    });
}

/// SIGTERM (what orchestrators send) or Ctrl-C.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c,
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

/// Runs `f` every `every` for as long as its target is alive.
fn spawn_periodic<T: Send + Sync + 'static>(
    target: Weak<T>,
    every: Duration,
    f: impl Fn(&T) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match target.upgrade() {
                Some(t) => f(&t),
                None => return,
            }
        }
    });
}

/// Warns once, as soon as Redis answers, when its `maxmemory-policy` could evict
/// revocation marks (readiness then stays 503; see `http::health`).
fn spawn_eviction_check(target: Weak<AppState>) {
    tokio::spawn(async move {
        loop {
            let Some(state) = target.upgrade() else {
                return;
            };
            match state.auth.revocations.health().await {
                Ok(MarksHealth::Unknown) => {
                    tracing::info!(
                        "Redis does not report its maxmemory-policy; make sure it is noeviction"
                    );
                    return;
                }
                Ok(MarksHealth::Ok) => return,
                Ok(MarksHealth::Unsafe(why)) => {
                    tracing::warn!(
                        %why,
                        "revocation marks may be dropped under memory pressure and revoked \
                         tokens would work again: set maxmemory-policy noeviction \
                         (readiness answers 503 until then)"
                    );
                    return;
                }
                Err(_) => {}
            }
            drop(state);
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}

/// Runs the cleanup every `every` (first pass one interval after start) for as long as
/// the application is alive; a failed pass (database down) is logged and retried.
fn spawn_cleanup(target: Weak<AppState>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(state) = target.upgrade() else {
                return;
            };
            if let Err(e) = state.auth.cleanup().await {
                tracing::warn!(error = %e, "cleanup pass failed; will retry");
            }
        }
    });
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/users", web::post().to(users::register)))
        .service(resource(
            "/users/anonymous",
            web::post().to(users::register_anonymous),
        ))
        .service(resource("/login", web::post().to(auth::login)))
        .service(resource("/login/mfa", web::post().to(auth::login_mfa)))
        .service(
            resource("/me/mfa/totp", web::post().to(mfa::enroll))
                .route(web::delete().to(mfa::remove)),
        )
        .service(resource(
            "/me/reauthenticate",
            web::post().to(mfa::reauthenticate),
        ))
        .service(resource(
            "/me/mfa/totp/confirm",
            web::post().to(mfa::confirm),
        ))
        .service(resource(
            "/admin/users/{id}/mfa",
            web::delete().to(mfa::admin_remove),
        ))
        .service(resource(
            "/email/verification",
            web::post().to(email::request_verification),
        ))
        .service(resource("/email/verify", web::post().to(email::verify)))
        .service(resource("/me/email", web::put().to(email::change_email)))
        .service(resource(
            "/email/change/confirm",
            web::post().to(email::confirm_email_change),
        ))
        .service(resource(
            "/password/forgot",
            web::post().to(email::forgot_password),
        ))
        .service(resource(
            "/password/reset",
            web::post().to(email::reset_password),
        ))
        .service(resource("/logout", web::post().to(auth::logout)))
        .service(resource("/refresh", web::post().to(token::refresh)))
        .service(resource("/token", web::post().to(token::token)))
        .service(resource("/revoke", web::post().to(token::revoke)))
        .service(resource("/introspect", web::post().to(token::introspect)))
        .service(
            resource("/me", web::get().to(users::me)).route(web::delete().to(users::delete_me)),
        )
        .service(resource(
            "/me/password",
            web::put().to(users::change_password),
        ))
        .service(resource("/sessions", web::get().to(sessions::list)))
        .service(resource("/sessions/{id}", web::delete().to(sessions::end)))
        .service(
            resource(
                "/admin/users/{id}/sessions",
                web::get().to(admin::user_sessions),
            )
            .route(web::delete().to(admin::end_user_sessions)),
        )
        .service(
            resource("/admin/users", web::get().to(admin::list_users))
                .route(web::post().to(admin::create_user)),
        )
        .service(
            resource("/admin/users/{id}", web::patch().to(admin::update_user))
                .route(web::get().to(admin::get_user))
                .route(web::delete().to(admin::delete_user)),
        )
        .service(resource(
            "/admin/users/{id}/password-reset",
            web::post().to(admin::send_reset),
        ))
        .service(resource("/admin/audit", web::get().to(admin::audit)))
        .service(resource(
            "/.well-known/jwks.json",
            web::get().to(well_known::jwks),
        ))
        .service(resource(
            "/.well-known/oauth-authorization-server",
            web::get().to(well_known::metadata),
        ))
        .service(resource("/health/live", web::get().to(health::live)))
        .service(resource("/health/ready", web::get().to(health::ready)))
        .service(resource("/openapi.json", web::get().to(openapi::document)));
}

/// CORS for SPAs on other origins: only the configured origins, with credentials (the
/// browser sends the refresh cookie; see `http::cookies` for the checks such requests
/// pass), `X-CSRF-Token` allowed, and the headers a client needs to read exposed.
/// Other origins get no CORS headers.
fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods(["GET", "POST", "PUT", "PATCH", "DELETE"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-csrf-token"),
        ])
        .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
        .supports_credentials()
        .max_age(3600);
    for origin in origins {
        cors = cors.allowed_origin(origin);
    }
    cors
}

/// A path with one method; any other method gets 405 in the contract's error shape.
/// A route whose other methods get 405 with the contract's body and the `Allow` header
/// of its documented methods (see [`crate::http::openapi`]).
fn resource(path: &str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path).route(route).default_service(web::to(
        |req: actix_web::HttpRequest| async move {
            let mut res = ApiError::MethodNotAllowed.error_response();
            let allow = req.match_pattern().and_then(|p| openapi::allowed(&p));
            if let Some(value) = allow.and_then(|a| header::HeaderValue::from_str(a).ok()) {
                res.headers_mut().insert(header::ALLOW, value);
            }
            res
        },
    ))
}

/// Errors produced outside our handlers (405 from the router, 431, actix internals)
/// get the contract's JSON body too; ours already have one and pass through.
fn contract_error_body<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let error = match res.status() {
        StatusCode::NOT_FOUND => ApiError::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        s if s.is_client_error() => ApiError::InvalidRequest("bad request".into()),
        _ => ApiError::Internal(anyhow::anyhow!("unhandled error status {}", res.status())),
    };
    let mut response: HttpResponse = error.error_response();
    if res.status().is_client_error() {
        *response.status_mut() = res.status();
    }
    let (req, _) = res.into_parts();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, response).map_into_right_body(),
    ))
}
