//! The one writer of a SQLite database: a thread of its own owns the write connection
//! and runs the write work that requests hand it, in turn, and several at once in one
//! `BEGIN IMMEDIATE` transaction when they queue up (group commit).
//!
//! Why: on SQLite every write waits for the one write lock, and what costs is not the
//! writing but the waiting between statements (a round trip to the connection's thread
//! per statement, the hand-over of the connection from one request to the next, one
//! disk flush per commit). Here the connection never changes hands, the work of a
//! queue of requests shares one commit (one flush), and each piece of work is usually
//! one command to the connection's thread.
//!
//! Work is a closure over the connection that returns its result; results are handed
//! back only once the transaction holding them has committed. If one piece of work
//! fails, the whole transaction is rolled back: that piece gets its error, and the
//! others of the batch a "retry" error (503), since their writes were undone too. The
//! store's work is written not to fail in normal operation (a taken email is an
//! `ON CONFLICT DO NOTHING`, not an error), so this only happens when the disk does.

use std::future::Future;
use std::pin::Pin;

use sqlx::sqlite::SqlitePool;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::store::{StoreError, StoreResult};

/// Most pieces of work in one transaction.
const MAX_BATCH: usize = 64;

pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// One piece of work on the write connection, inside the batch's transaction.
pub type Work<T> = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, sqlx::Error>> + Send,
>;

trait Job: Send {
    /// Runs the work; false when it failed (its error is kept for [`Job::finish`]).
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// Answers the caller once the transaction is over.
    fn finish(self: Box<Self>, committed: Result<(), &str>);
}

struct Typed<T> {
    work: Option<Work<T>>,
    outcome: Option<Result<T, sqlx::Error>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T: Send + 'static> Job for Typed<T> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let Some(work) = self.work.take() else {
                return false;
            };
            let outcome = work(conn).await;
            let ok = outcome.is_ok();
            self.outcome = Some(outcome);
            ok
        })
    }

    fn finish(self: Box<Self>, committed: Result<(), &str>) {
        let answer = match (committed, self.outcome) {
            (Ok(()), Some(Ok(value))) => Ok(value),
            (_, Some(Err(e))) => Err(super::classify(e)),
            (Err(why), _) => Err(StoreError::Unavailable(anyhow::anyhow!(
                "the write was rolled back ({why}); retry"
            ))),
            (Ok(()), None) => Err(StoreError::Other(anyhow::anyhow!("the write never ran"))),
        };
        // The caller may have gone (a dropped request): nothing to tell.
        let _ = self.reply.send(answer);
    }
}

/// Hands work to the writer thread.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the writer thread on `pool` (one connection). The thread ends when every
    /// `Writer` handle is gone.
    pub fn start(pool: impl FnOnce() -> SqlitePool + Send + 'static) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("tessera-sqlite-writer".into())
            .spawn(move || runtime.block_on(async move { run(pool(), queue).await }))?;
        Ok(Writer { jobs })
    }

    /// Runs `work` in a write transaction; its result once that has committed.
    pub async fn write<T: Send + 'static>(&self, work: Work<T>) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Typed {
            work: Some(work),
            outcome: None,
            reply,
        });
        let gone = || StoreError::Unavailable(anyhow::anyhow!("the SQLite writer has stopped"));
        self.jobs.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::UnboundedReceiver<Box<dyn Job>>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = run_batch(&pool, &mut batch).await;
        for job in batch {
            job.finish(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
    pool.close().await;
}

/// Runs every job of the batch in one transaction; why it did not commit, if it did not.
async fn run_batch(pool: &SqlitePool, batch: &mut [Box<dyn Job>]) -> Result<(), String> {
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| e.to_string())?;
    for job in batch.iter_mut() {
        if !job.run(&mut tx).await {
            tx.rollback().await.ok();
            return Err("another write of its transaction failed".into());
        }
    }
    tx.commit().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;

    fn statement(sql: &'static str) -> Work<()> {
        Box::new(move |conn| {
            Box::pin(async move { sqlx::query(sql).execute(&mut *conn).await.map(|_| ()) })
        })
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back_its_batch_and_tells_each_writer() {
        let dir =
            std::env::temp_dir().join(format!("tessera-writer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.join("w.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let writer = Writer::start(move || {
            SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options)
        })
        .unwrap();
        writer
            .write(statement("CREATE TABLE t (v INTEGER UNIQUE)"))
            .await
            .unwrap();

        // The first write holds the connection while three more queue up behind it, so
        // that those three share one transaction; one of them breaks the constraint.
        let slow: Work<()> = Box::new(|conn| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                sqlx::query("INSERT INTO t VALUES (1)")
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
            })
        });
        let later = |sql| {
            let writer = writer.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                writer.write(statement(sql)).await
            }
        };
        let (first, ok_before, broken, ok_after) = tokio::join!(
            writer.write(slow),
            later("INSERT INTO t VALUES (2)"),
            later("INSERT INTO t VALUES (1)"),
            later("INSERT INTO t VALUES (3)"),
        );
        first.unwrap();
        assert!(matches!(broken, Err(StoreError::Conflict)), "{broken:?}");
        for other in [ok_before, ok_after] {
            assert!(
                matches!(&other, Err(StoreError::Unavailable(e)) if e.to_string().contains("retry")),
                "{other:?}"
            );
        }
        // Nothing of the failed transaction stayed, and the writer goes on.
        writer
            .write(statement("INSERT INTO t VALUES (4)"))
            .await
            .unwrap();
        let values: Work<Vec<i64>> = Box::new(|conn| {
            Box::pin(async move {
                sqlx::query_scalar("SELECT v FROM t ORDER BY v")
                    .fetch_all(&mut *conn)
                    .await
            })
        });
        assert_eq!(writer.write(values).await.unwrap(), [1, 4]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
