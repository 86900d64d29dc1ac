//! The feed against a real Redis (`TESSERA_TEST_REDIS`, else 127.0.0.1:6379).

use std::time::Duration;

use tessera_marks::{Feed, FeedConfig, Subject};
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("TESSERA_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(prefix: &str) -> FeedConfig {
    FeedConfig {
        redis_url: redis_url(),
        ca_pem: None,
        key_prefix: prefix.to_owned(),
        max_unsynced: Duration::from_secs(2),
        lease: None,
    }
}

/// Writes a session mark the way the server does: the key and its message together.
async fn revoke_session(prefix: &str, sid: Uuid) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::pipe()
        .set_ex(format!("{prefix}revoked:sid:{sid}"), "1", 60)
        .ignore()
        .publish(
            format!("{prefix}revocations"),
            format!("revoked:sid:{sid} 1 60"),
        )
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn session(sid: Uuid) -> Subject<'static> {
    Subject {
        session: sid,
        jti: "jti",
        user: Uuid::new_v4(),
        issued_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_loads_existing_marks_and_a_barrier_sees_every_later_one() {
    let prefix = format!("marks_test_{}:", Uuid::new_v4().simple());
    let before = Uuid::new_v4();
    revoke_session(&prefix, before).await;
    let feed = Feed::start(config(&prefix)).unwrap();
    assert!(feed.wait_synced(Duration::from_secs(10)).await);
    assert!(feed.revokes(&session(before)), "loaded by the resync");
    assert!(!feed.revokes(&session(Uuid::new_v4())));
    // Each mark written before a barrier begins is in the copy once it passes.
    for _ in 0..50 {
        let sid = Uuid::new_v4();
        revoke_session(&prefix, sid).await;
        assert!(feed.barrier(Duration::from_secs(2)).await);
        assert!(feed.revokes(&session(sid)));
    }
    assert_eq!(feed.len(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiting_checks_share_the_barrier_and_all_pass() {
    let prefix = format!("marks_test_{}:", Uuid::new_v4().simple());
    let feed = Feed::start(config(&prefix)).unwrap();
    assert!(feed.wait_synced(Duration::from_secs(10)).await);
    let waiting = (0..200).map(|_| {
        let feed = feed.clone();
        tokio::spawn(async move { feed.barrier(Duration::from_secs(2)).await })
    });
    for passed in futures_util::future::join_all(waiting).await {
        assert!(passed.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_copy_is_unsynced_and_barriers_fail_at_once() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let feed = Feed::start(FeedConfig {
        redis_url: format!("redis://127.0.0.1:{port}"),
        ..config("marks_test_down:")
    })
    .unwrap();
    assert!(!feed.wait_synced(Duration::from_millis(300)).await);
    let (_, ever) = feed.unsynced().expect("unsynced");
    assert!(!ever);
    let started = std::time::Instant::now();
    assert!(!feed.barrier(Duration::from_secs(5)).await);
    assert!(started.elapsed() < Duration::from_secs(1));
}
