//! Redis high availability: `redis+sentinel://` against a primary, a replica and a
//! sentinel the test starts (`redis-server`, on free ports; the machine's Redis is not
//! touched). A failover during steady traffic gives 503s for a moment and nothing
//! else; a revocation answered before the failover still holds after it
//! (`redis.wait_replicas = 1`: it was on the replica before it was answered).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::helpers::*;

const SERVICE: &str = "tessera";

struct Node {
    port: u16,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis node working in `dir`: a replica writes the snapshot it is sent to its
/// working directory whatever `--save` says.
fn redis_node(port: u16, dir: &std::path::Path, extra: &[&str]) -> Node {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs (scripts/services.sh installs it)");
    Node { port, child }
}

fn sentinel(port: u16, primary: u16, dir: &std::path::Path) -> Node {
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n\
             sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds {SERVICE} 1000\n\
             sentinel failover-timeout {SERVICE} 5000\n"
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel runs");
    Node { port, child }
}

async fn ask(port: u16, cmd: &mut redis::Cmd) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut conn).await
}

/// The primary's port as the sentinel names it.
async fn primary_port(sentinel: u16) -> Option<u16> {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("get-master-addr-by-name").arg(SERVICE);
    let value = ask(sentinel, &mut cmd).await.ok()?;
    let (_, port): (String, String) = redis::from_redis_value(value).ok()?;
    port.parse().ok()
}

/// Whether `port` is a replica whose link to its primary is up.
async fn replica_in_sync(port: u16) -> bool {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("replication");
    match ask(port, &mut cmd)
        .await
        .map(redis::from_redis_value::<String>)
    {
        Ok(Ok(info)) => info.contains("role:slave") && info.contains("master_link_status:up"),
        _ => false,
    }
}

/// Whether the sentinel knows `replica` as a healthy replica.
async fn sentinel_knows(sentinel: u16, replica: u16) -> bool {
    let mut cmd = redis::cmd("SENTINEL");
    cmd.arg("replicas").arg(SERVICE);
    let Ok(value) = ask(sentinel, &mut cmd).await else {
        return false;
    };
    let text = format!("{value:?}");
    text.contains(&replica.to_string()) && !text.contains("s_down")
}

async fn wait(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_gives_a_moment_of_503s_and_keeps_every_revocation() {
    crate::shared_backend_only!();
    let dir = std::env::temp_dir().join(format!("tessera-sentinel-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let primary = redis_node(free_port(), &dir, &[]);
    let replica_of = primary.port.to_string();
    let replica = redis_node(
        free_port(),
        &dir,
        &["--replicaof", "127.0.0.1", &replica_of],
    );
    let watcher = sentinel(free_port(), primary.port, &dir);
    wait("the replica in sync", 30, async || {
        replica_in_sync(replica.port).await
    })
    .await;
    wait("the sentinel to know the replica", 30, async || {
        sentinel_knows(watcher.port, replica.port).await
    })
    .await;

    let mut settings = test_settings();
    settings.redis.url = format!("redis+sentinel://127.0.0.1:{}/{SERVICE}", watcher.port).into();
    settings.redis.wait_replicas = 1;
    settings.redis.timeout_ms = 500;
    let app = Arc::new(spawn_app_with(settings).await);
    let email = app.new_user().await;
    let revoked = app.login_ok(&email).await;
    let steady = app.login_ok(&email).await;
    assert_eq!(
        app.logout(&revoked.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.me(&revoked.access).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Steady traffic: the same valid token, over and over.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (app, stop, access) = (app.clone(), stop.clone(), steady.access.clone());
        async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                seen.push(app.me(&access).await.status());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The primary dies; the sentinel promotes the replica.
    let old_primary = primary.port;
    drop(primary);
    wait("the failover", 60, async || {
        primary_port(watcher.port).await == Some(replica.port)
    })
    .await;
    wait("requests to succeed again", 30, async || {
        app.me(&steady.access).await.status() == StatusCode::OK
    })
    .await;
    // The revocation made before the failover holds on the promoted replica.
    assert_eq!(
        app.me(&revoked.access).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Until a replica is back, revocations (which wait for one) answer 503. The old
    // primary's host comes back as a replica of the new one: they are answered again,
    // and hold.
    let new_primary = replica.port.to_string();
    let _back = redis_node(
        old_primary,
        &dir,
        &["--replicaof", "127.0.0.1", &new_primary],
    );
    let mut later = app.login_ok(&email).await;
    wait("a logout answered after the failover", 60, async || {
        match app.logout(&later.access, None).await.status() {
            StatusCode::NO_CONTENT => true,
            // Revoked, though not yet on a replica: try again with a new session.
            StatusCode::SERVICE_UNAVAILABLE => {
                later = app.login_ok(&email).await;
                false
            }
            other => panic!("logout answered {other}"),
        }
    })
    .await;
    assert_eq!(
        app.me(&later.access).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.me(&revoked.access).await.status(),
        StatusCode::UNAUTHORIZED
    );

    stop.store(true, Ordering::SeqCst);
    let seen = traffic.await.unwrap();
    let unavailable = seen
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(
        seen.iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "only 200 and 503 during the failover: {seen:?}"
    );
    // The 503s are one burst, and the traffic ends answered.
    let first = seen.iter().position(|s| *s != StatusCode::OK);
    let last = seen.iter().rposition(|s| *s != StatusCode::OK);
    if let (Some(first), Some(last)) = (first, last) {
        assert_eq!(last - first + 1, unavailable, "one burst: {seen:?}");
    }
    assert_eq!(seen.last(), Some(&StatusCode::OK));
    eprintln!(
        "failover: {unavailable} of {} checks answered 503",
        seen.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
