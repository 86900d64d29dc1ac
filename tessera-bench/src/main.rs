//! `tessera-bench`: Tessera's load generator and benchmark suite.
//!
//! `tessera-bench suite` measures the machine's ceilings (argon2, signatures, the bare
//! refresh transaction, an empty handler) and every scenario in one run, and prints one
//! markdown table of throughput, latency and ratios against the ceilings. It expects a
//! running server with the same `TESSERA__*` settings as its own environment (it reads
//! the argon2 parameters, the signing key and the database from them) and a second
//! "setup" instance on the same database with cheap argon2 parameters, through which it
//! logs in the thousands of sessions the refresh, `/me`, `/introspect` and logout
//! scenarios consume; the login scenarios only ever use the main server.
//! `scripts/bench.sh` starts both on fresh data and runs the suite.
//!
//! `tessera-bench get` is the bare load generator for one GET path, closed loop or at a
//! fixed rate.

mod ceiling;
mod load;
mod pair;
mod report;
mod scenario;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use hyper::StatusCode;
use tessera::config::Settings;

use crate::load::{Outcome, Pace, Plan, Request};
use crate::report::Row;
use crate::scenario::{Logins, Logouts, RefreshChain, Repeat, Session, Spa, Users};

#[derive(Parser)]
#[command(about = "Load generator and benchmark suite for Tessera")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every scenario and ceiling and print the markdown table.
    Suite(SuiteArgs),
    /// Load one GET path.
    Get {
        /// Server address, e.g. 127.0.0.1:8080.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/health/live")]
        path: String,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Total requests per second (fixed-rate mode); closed loop without it.
        #[arg(long)]
        rate: Option<f64>,
        /// `Authorization: Bearer` token to send.
        #[arg(long)]
        bearer: Option<String>,
    },
}

#[derive(clap::Args)]
struct SuiteArgs {
    /// The server under test.
    #[arg(long)]
    addr: SocketAddr,
    /// An instance on the same database and keys with cheap argon2 parameters, used
    /// to log in the sessions that the non-login scenarios consume, and as the second
    /// instance of the two-instance correctness check (`pair`).
    #[arg(long)]
    setup_addr: SocketAddr,
    /// The server's process id, to sample its resident memory during the login flood.
    #[arg(long)]
    server_pid: u32,
    /// Resource-server credentials for /introspect, "id:secret".
    #[arg(long)]
    introspect_client: String,
    /// Connections of the closed-loop scenarios (and tasks of the bare transaction).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Connections of the login scenario (enough to keep every hashing thread busy).
    #[arg(long, default_value_t = 8)]
    login_connections: usize,
    /// Connections flooding /login in the latency-under-flood scenario.
    #[arg(long, default_value_t = 64)]
    flood_connections: usize,
    /// Fixed rates of the latency scenarios (refresh and /me, unloaded and under flood).
    #[arg(long, default_value_t = 200.0)]
    refresh_rate: f64,
    #[arg(long, default_value_t = 1000.0)]
    me_rate: f64,
    /// Sessions logged out in the logout scenario.
    #[arg(long, default_value_t = 20_000)]
    logout_sessions: usize,
    /// Length of each scenario, and of each ceiling measurement.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Start of each scenario that is not recorded.
    #[arg(long, default_value_t = 1)]
    warmup_secs: u64,
    /// Run only these parts (comma-separated): ceilings, empty, login, refresh, me
    /// (with /introspect), logout, mixed, flood, pair (two instances, correctness). Ratios against a ceiling that was not
    /// run show as not measured.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the table (it is printed as well).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Suite(args) => suite(args).await,
            Command::Get {
                addr,
                path,
                connections,
                secs,
                rate,
                bearer,
            } => get(addr, path, connections, secs, rate, bearer).await,
        }
    })
}

async fn get(
    addr: SocketAddr,
    path: String,
    connections: usize,
    secs: u64,
    rate: Option<f64>,
    bearer: Option<String>,
) -> anyhow::Result<()> {
    let path: &'static str = Box::leak(path.into_boxed_str());
    let mut request = Request::get(path);
    if let Some(token) = &bearer {
        request = request.bearer(token);
    }
    let workloads = (0..connections)
        .map(|_| Repeat {
            kind: "get",
            request: request.clone(),
            expect: StatusCode::OK,
        })
        .collect();
    let plan = Plan {
        pace: rate.map_or(Pace::Closed, Pace::Rate),
        duration: Duration::from_secs(secs),
        warmup: Duration::from_secs(1).min(Duration::from_secs(secs) / 2),
    };
    let outcome = load::run(path, addr, plan, workloads).await?;
    let rows = [Row::measured(
        format!("GET {path}"),
        outcome.rate("get"),
        outcome.kind("get"),
    )];
    println!(
        "{}",
        report::table(&format!("{connections} connections, {plan:?}"), &rows)
    );
    Ok(())
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

async fn suite(args: SuiteArgs) -> anyhow::Result<()> {
    let settings = Settings::load(None)?;
    let secs = Duration::from_secs(args.secs);
    let closed = Plan {
        pace: Pace::Closed,
        duration: secs,
        warmup: Duration::from_secs(args.warmup_secs),
    };
    let c = args.connections;
    let alg = &settings.tokens.algorithm;
    let mut rows = Vec::new();

    // Ceilings of the machine, with nothing else running.
    let (mut argon2, mut argon2_pool, mut empty_rate) = (f64::NAN, f64::NAN, f64::NAN);
    let pool_threads = tessera::auth::password::hashing_threads(&settings.password);
    if args.wants("ceilings") {
        step("ceiling: argon2 verifications on all cores");
        argon2 = ceiling::argon2_verifications(&settings.password, ceiling::cores(), secs)?;
        argon2_pool = match pool_threads == ceiling::cores() {
            true => argon2,
            false => {
                step("ceiling: argon2 verifications on the server's hashing threads");
                ceiling::argon2_verifications(&settings.password, pool_threads, secs)?
            }
        };
        step("ceiling: raw signatures and verifications on all cores");
        let (signs, verifies) = ceiling::sign_and_verify(&settings, secs / 2)?;
        rows.push(Row::ceiling(
            "ceiling: argon2id verifications (configured params, all cores)",
            argon2,
        ));
        rows.push(Row::ceiling(
            format!(
                "ceiling: argon2id verifications on the server's {pool_threads} hashing thread(s)"
            ),
            argon2_pool,
        ));
        rows.push(Row::ceiling(
            format!("ceiling: raw {alg} signatures (all cores)"),
            signs,
        ));
        rows.push(Row::ceiling(
            format!("ceiling: raw {alg} verifications (all cores)"),
            verifies,
        ));
    }

    if args.wants("empty") {
        step("ceiling: empty handler (GET /health/live)");
        let empty = load::run(
            "empty",
            args.addr,
            closed,
            repeat(c, "empty", Request::get("/health/live"), StatusCode::OK),
        )
        .await?;
        empty_rate = empty.rate("empty");
        rows.push(Row::measured(
            format!("ceiling: empty handler, GET /health/live ({c} conns)"),
            empty_rate,
            empty.kind("empty"),
        ));
    }

    // Users: the login users are hashed by the server under test (configured
    // parameters); the session users by the setup instance (cheap ones).
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let login_users = Users::new(&format!("{tag}-login"), 256);
    let session_users = Users::new(&format!("{tag}-session"), 256);
    step("seeding: registering 256 login users (configured argon2 cost) and 256 session users");
    scenario::register(args.addr, &login_users, args.login_connections).await?;
    scenario::register(args.setup_addr, &session_users, c).await?;

    if args.wants("login") {
        step("scenario: login");
        let login = load::run(
            "login",
            args.addr,
            closed,
            (0..args.login_connections)
                .map(|i| Logins {
                    users: login_users.clone(),
                    next: i * 31,
                })
                .collect(),
        )
        .await?;
        let login_rate = login.rate("login");
        rows.push(
            Row::measured(
                format!("POST /login ({} conns)", args.login_connections),
                login_rate,
                login.kind("login"),
            )
            .against(login_rate, argon2, "argon2 ceiling", 0.9, false),
        );
        rows.push(
            Row::measured(
                format!("POST /login, against the hashing threads' ceiling ({pool_threads})"),
                login_rate,
                login.kind("login"),
            )
            .against(
                login_rate,
                argon2_pool,
                "argon2 on the pool's threads",
                0.9,
                false,
            ),
        );
    }

    if args.wants("refresh") {
        step("scenario: refresh (one chain per connection)");
        let chains = sessions(&args, &session_users, c).await?;
        let refresh = load::run(
            "refresh",
            args.addr,
            closed,
            chains
                .into_iter()
                .map(|s| RefreshChain {
                    token: Some(s.refresh_token),
                })
                .collect(),
        )
        .await?;
        step("ceiling: the refresh transaction alone, same concurrency");
        let chains = sessions(&args, &session_users, c).await?;
        let bare = ceiling::bare_refresh(
            &settings,
            chains.into_iter().map(|s| s.refresh_token).collect(),
            secs,
            closed.warmup,
        )
        .await?;
        let bare_rate = bare.rate("bare refresh");
        let refresh_rate = refresh.rate("refresh");
        rows.push(Row::measured(
            format!(
                "ceiling: refresh transaction on the store, no HTTP ({c} tasks, pool {})",
                settings.database.max_connections
            ),
            bare_rate,
            bare.kind("bare refresh"),
        ));
        rows.push(
            Row::measured(
                format!("POST /refresh ({c} conns, own chains)"),
                refresh_rate,
                refresh.kind("refresh"),
            )
            .against(refresh_rate, bare_rate, "bare transaction", 0.6, false),
        );
    }

    if args.wants("me") {
        step("scenario: /me");
        let me_sessions = sessions(&args, &session_users, c).await?;
        let me = load::run(
            "me",
            args.addr,
            closed,
            me_sessions
                .iter()
                .map(|s| Repeat {
                    kind: "me",
                    request: Request::get("/me").bearer(&s.access_token),
                    expect: StatusCode::OK,
                })
                .collect(),
        )
        .await?;
        let me_rate = me.rate("me");
        rows.push(
            Row::measured(format!("GET /me ({c} conns)"), me_rate, me.kind("me")).against(
                me_rate,
                empty_rate,
                "empty handler",
                0.7,
                false,
            ),
        );

        step("scenario: /introspect");
        let (id, secret) = args
            .introspect_client
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--introspect-client must be id:secret"))?;
        let introspect = load::run(
            "introspect",
            args.addr,
            closed,
            me_sessions
                .iter()
                .map(|s| Repeat {
                    kind: "introspect",
                    request: Request::post_form("/introspect", format!("token={}", s.access_token))
                        .basic(id, secret),
                    expect: StatusCode::OK,
                })
                .collect(),
        )
        .await?;
        rows.push(Row::measured(
            format!("POST /introspect ({c} conns)"),
            introspect.rate("introspect"),
            introspect.kind("introspect"),
        ));
    }

    if args.wants("logout") {
        step(&format!(
            "scenario: logout ({} sessions)",
            args.logout_sessions
        ));
        let to_end = sessions(&args, &session_users, args.logout_sessions).await?;
        let mut per_conn: Vec<Logouts> = (0..c)
            .map(|_| Logouts {
                access_tokens: Vec::new(),
            })
            .collect();
        for (i, s) in to_end.into_iter().enumerate() {
            per_conn[i % c].access_tokens.push(s.access_token);
        }
        let logout = load::run(
            "logout",
            args.addr,
            Plan {
                warmup: Duration::ZERO,
                ..closed
            },
            per_conn,
        )
        .await?;
        rows.push(Row::measured(
            format!("POST /logout ({c} conns)"),
            logout.rate("logout"),
            logout.kind("logout"),
        ));
    }

    if args.wants("mixed") {
        step("scenario: mixed SPA workload (1 login : 20 refresh : 200 /me)");
        let mixed = load::run(
            "mixed",
            args.addr,
            closed,
            (0..c)
                .map(|i| Spa {
                    users: login_users.clone(),
                    user: i * 7,
                    step: 0,
                    session: None,
                })
                .collect(),
        )
        .await?;
        let mixed_total: f64 = ["login", "refresh", "me"]
            .iter()
            .map(|k| mixed.rate(k))
            .sum();
        let mut all = load::Stats::new();
        for stats in mixed.by_kind.values() {
            all.merge(stats);
        }
        rows.push(Row::measured(
            format!("mixed SPA, all requests ({c} conns)"),
            mixed_total,
            &all,
        ));
        for kind in ["login", "refresh", "me"] {
            rows.push(Row::measured(
                format!("mixed SPA: {kind}"),
                mixed.rate(kind),
                mixed.kind(kind),
            ));
        }
    }

    if args.wants("flood") {
        step("scenario: refresh and /me latency at a fixed rate, unloaded");
        let unloaded = latency_probe(&args, &settings, &session_users, secs, None).await?;
        step(&format!(
            "scenario: the same while {} connections flood /login",
            args.flood_connections
        ));
        let flood_plan = Plan {
            pace: Pace::Closed,
            ..closed
        };
        let flood_workloads: Vec<Logins> = (0..args.flood_connections)
            .map(|i| Logins {
                users: login_users.clone(),
                next: i * 13,
            })
            .collect();
        let flooded = latency_probe(
            &args,
            &settings,
            &session_users,
            secs,
            Some((flood_plan, flood_workloads)),
        )
        .await?;
        for (kind, rate) in [("refresh", args.refresh_rate), ("me", args.me_rate)] {
            let base = unloaded.probe.kind(kind).ms(0.99);
            let under = flooded.probe.kind(kind);
            rows.push(Row::measured(
                format!("{kind} at {rate:.0}/s, unloaded"),
                unloaded.probe.rate(kind),
                unloaded.probe.kind(kind),
            ));
            rows.push(
                Row::measured(
                    format!("{kind} at {rate:.0}/s, during the login flood"),
                    flooded.probe.rate(kind),
                    under,
                )
                .against(under.ms(0.99), base, "unloaded p99", 2.0, true),
            );
        }
        if let Some(flood) = &flooded.flood {
            rows.push(Row::measured(
                format!(
                    "login flood ({} conns): accepted logins",
                    args.flood_connections
                ),
                flood.rate("login"),
                flood.kind("login"),
            ));
        }
        let peak_mb = flooded.peak_rss_kib as f64 / 1024.0;
        match flooded.peak_own_kib {
            None => rows.push(Row::bounded(
                "peak resident memory of the server during the login flood",
                peak_mb,
                150.0,
                "MB",
            )),
            Some(own) => {
                rows.push(Row::figure(
                    "peak resident memory of the server during the login flood, with the \
                     pages of the SQLite file it reads through mmap (page cache)",
                    peak_mb,
                    "MB",
                ));
                rows.push(Row::bounded(
                    "peak resident memory of the server during the login flood, without \
                     the database file's pages (as in the PostgreSQL mode)",
                    own as f64 / 1024.0,
                    150.0,
                    "MB",
                ));
            }
        }
    }

    let mut pair_failures = 0;
    if args.wants("pair") {
        // The setup instance shares the database, keys and Redis: two instances.
        step(
            "check: two instances, the same refresh tokens to both at once, logouts checked across",
        );
        let start = sessions(&args, &session_users, c).await?;
        let report = pair::check(
            args.addr,
            args.setup_addr,
            start,
            session_users.clone(),
            secs,
        )
        .await?;
        rows.push(Row::measured(
            format!("two instances: refresh pairs, one token to both at once ({c} chains)"),
            report.rounds as f64 / report.secs,
            &report.pairs,
        ));
        rows.push(Row::none_allowed(
            "two instances: forked chains (two different successors)",
            report.forked,
        ));
        rows.push(Row::none_allowed(
            "two instances: lost sessions (a pair refused, or a chain dead at the end)",
            report.lost,
        ));
        rows.push(Row::none_allowed(
            "two instances: fresh access tokens refused by the other instance",
            report.fresh_refused,
        ));
        rows.push(Row::none_allowed(
            format!(
                "two instances: logouts ({}) not refused at once on the other (access or refresh)",
                report.logouts
            ),
            report.missed,
        ));
        pair_failures = report.failures();
    }

    let heading = format!(
        "Tessera benchmark, {}: {}; {} cores; {alg}; argon2id m={} KiB t={} p={}; {}s per scenario after {}s warmup",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        match tessera::store::Backend::from_settings(&settings.database)? {
            tessera::store::Backend::Sqlite => "SQLite, revocations in process",
            tessera::store::Backend::Postgres => "PostgreSQL + Redis",
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.password.memory_kib,
        settings.password.iterations,
        settings.password.parallelism,
        args.secs.saturating_sub(args.warmup_secs),
        args.warmup_secs,
    );
    let table = report::table(&heading, &rows);
    println!("{table}");
    if let Some(path) = &args.out {
        std::fs::write(path, &table)?;
        eprintln!("wrote {}", path.display());
    }
    anyhow::ensure!(
        pair_failures == 0,
        "the two-instance check failed {pair_failures} time(s): see the table"
    );
    Ok(())
}

impl SuiteArgs {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn repeat(n: usize, kind: &'static str, request: Request, expect: StatusCode) -> Vec<Repeat> {
    (0..n)
        .map(|_| Repeat {
            kind,
            request: request.clone(),
            expect,
        })
        .collect()
}

/// Logs in `count` fresh sessions through the setup instance.
async fn sessions(args: &SuiteArgs, users: &Users, count: usize) -> anyhow::Result<Vec<Session>> {
    scenario::login_sessions(args.setup_addr, users, count, args.connections.min(count)).await
}

struct Probe {
    /// Refresh and /me at their fixed rates.
    probe: Outcome,
    flood: Option<Outcome>,
    peak_rss_kib: u64,
    /// The peak of resident memory less the database file's memory map (SQLite only,
    /// see [`ceiling::mapped_kib`]).
    peak_own_kib: Option<u64>,
}

/// Refresh and /me at fixed rates (8 connections each), with an optional concurrent
/// flood; samples the server's resident memory every 20 ms meanwhile.
async fn latency_probe(
    args: &SuiteArgs,
    settings: &Settings,
    users: &Users,
    secs: Duration,
    flood: Option<(Plan, Vec<Logins>)>,
) -> anyhow::Result<Probe> {
    let conns = 8;
    let chains = sessions(args, users, conns).await?;
    let me = sessions(args, users, conns).await?;
    let rated = |rate: f64| Plan {
        pace: Pace::Rate(rate),
        duration: secs,
        warmup: Duration::from_secs(args.warmup_secs),
    };
    let refresh = load::run(
        "refresh (fixed rate)",
        args.addr,
        rated(args.refresh_rate),
        chains
            .into_iter()
            .map(|s| RefreshChain {
                token: Some(s.refresh_token),
            })
            .collect(),
    );
    let me = load::run(
        "me (fixed rate)",
        args.addr,
        rated(args.me_rate),
        me.iter()
            .map(|s| Repeat {
                kind: "me",
                request: Request::get("/me").bearer(&s.access_token),
                expect: StatusCode::OK,
            })
            .collect(),
    );
    let sampling = Arc::new(AtomicBool::new(true));
    let (peak, peak_own) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let database = database_file(settings);
    let sampler = tokio::spawn({
        let (sampling, pid) = (sampling.clone(), args.server_pid);
        let (peak, peak_own, database) = (peak.clone(), peak_own.clone(), database.clone());
        async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(kib) = ceiling::rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                    let mapped = database
                        .as_deref()
                        .and_then(|f| ceiling::mapped_kib(pid, f));
                    peak_own.fetch_max(kib.saturating_sub(mapped.unwrap_or(0)), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let (refresh, me, flood) = match flood {
        Some((plan, workloads)) => {
            let flood = load::run("login flood", args.addr, plan, workloads);
            let (r, m, f) = tokio::join!(refresh, me, flood);
            (r?, m?, Some(f?))
        }
        None => {
            let (r, m) = tokio::join!(refresh, me);
            (r?, m?, None)
        }
    };
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let mut probe = refresh;
    probe.by_kind.extend(me.by_kind);
    Ok(Probe {
        probe,
        flood,
        peak_rss_kib: peak.load(Ordering::Relaxed),
        peak_own_kib: database.map(|_| peak_own.load(Ordering::Relaxed)),
    })
}

/// The SQLite database file of `settings` (absolute, as /proc names it), if that is the
/// backend.
fn database_file(settings: &Settings) -> Option<std::path::PathBuf> {
    use tessera::store::{Backend, sqlite::SqliteStore};
    if !matches!(
        Backend::from_settings(&settings.database),
        Ok(Backend::Sqlite)
    ) {
        return None;
    }
    let path = SqliteStore::file_of(&settings.database).ok()?;
    Some(std::fs::canonicalize(&path).unwrap_or(path))
}
