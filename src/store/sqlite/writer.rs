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
//!
//! The hottest write, a refresh token's rotation, is a [`Piece`]: one text of
//! statements and its arguments. The pieces of a batch that share a text go to the
//! connection as one command (the text repeated, each copy taking its own arguments),
//! so a queue of rotations costs one round trip to the connection's thread, not one
//! each: that thread otherwise waits on the hand-over about half the time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::error::BoxDynError;
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::store::{StoreError, StoreResult};

/// Most pieces of work in one transaction.
const MAX_BATCH: usize = 64;

/// Most [`Piece`]s in one command. Commands hold a power of two of them at most this
/// large, so that the connection's statement cache keeps a handful of texts, not one
/// per batch size.
const MAX_PIECES: usize = 16;

pub type BoxFuture<'c, T> = Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// One piece of work on the write connection, inside the batch's transaction.
pub type Work<T> = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, sqlx::Error>> + Send,
>;

/// Write work that is one text of statements and its arguments, answered from at most
/// one row of its last statement. Pieces with the same text that queue up together run
/// as one command (see the module docs).
pub trait Piece: Send + 'static {
    type Output: Send + 'static;
    /// The statements. The last one returns at most one row, whose first column is the
    /// `slot` given to [`Piece::bind`].
    fn sql(&self) -> &'static str;
    /// Adds the arguments in the order of the text's `?`s, `slot` where the text has it.
    fn bind(&mut self, slot: i64, args: &mut SqliteArguments) -> Result<(), BoxDynError>;
    /// The answer from the piece's row (`None`: its last statement returned nothing).
    fn read(&mut self, row: Option<&SqliteRow>) -> Result<Self::Output, sqlx::Error>;
    /// Runs the piece alone (a batch with no other piece of its text); the store runs
    /// its compile-time checked statement here.
    fn alone(
        self: Box<Self>,
        conn: &mut SqliteConnection,
    ) -> BoxFuture<'_, Result<Self::Output, sqlx::Error>>;
}

trait Job: Send {
    /// Runs the work; false when it failed (its error is kept for [`Job::finish`]).
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// Answers the caller once the transaction is over.
    fn finish(self: Box<Self>, committed: Result<(), &str>);
    /// The text of a [`Piece`]; `None` for other work.
    fn piece_sql(&self) -> Option<&'static str> {
        None
    }
    /// A piece's arguments for a shared command.
    fn bind(&mut self, _slot: i64, _args: &mut SqliteArguments) -> Result<(), BoxDynError> {
        Err("not a piece".into())
    }
    /// A piece's outcome from a shared command (its row, or the command's failure);
    /// false when it failed.
    fn settle(&mut self, _outcome: Result<Option<&SqliteRow>, sqlx::Error>) -> bool {
        false
    }
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
        // The caller may have gone (a dropped request): nothing to tell.
        let _ = self.reply.send(answer(committed, self.outcome));
    }
}

struct PieceJob<P: Piece> {
    piece: Option<Box<P>>,
    outcome: Option<Result<P::Output, sqlx::Error>>,
    reply: oneshot::Sender<StoreResult<P::Output>>,
}

impl<P: Piece> Job for PieceJob<P> {
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let Some(piece) = self.piece.take() else {
                return false;
            };
            let outcome = piece.alone(conn).await;
            let ok = outcome.is_ok();
            self.outcome = Some(outcome);
            ok
        })
    }

    fn finish(self: Box<Self>, committed: Result<(), &str>) {
        let _ = self.reply.send(answer(committed, self.outcome));
    }

    fn piece_sql(&self) -> Option<&'static str> {
        self.piece.as_ref().map(|p| p.sql())
    }

    fn bind(&mut self, slot: i64, args: &mut SqliteArguments) -> Result<(), BoxDynError> {
        match self.piece.as_mut() {
            Some(piece) => piece.bind(slot, args),
            None => Err("the piece already ran".into()),
        }
    }

    fn settle(&mut self, outcome: Result<Option<&SqliteRow>, sqlx::Error>) -> bool {
        let outcome = match (outcome, self.piece.take()) {
            (Ok(row), Some(mut piece)) => piece.read(row),
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(sqlx::Error::Protocol("the piece already ran".into())),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }
}

/// What the caller of one piece of work is told once its transaction is over.
fn answer<T>(
    committed: Result<(), &str>,
    outcome: Option<Result<T, sqlx::Error>>,
) -> StoreResult<T> {
    match (committed, outcome) {
        (Ok(()), Some(Ok(value))) => Ok(value),
        (_, Some(Err(e))) => Err(super::classify(e)),
        (Err(why), _) => Err(StoreError::Unavailable(anyhow::anyhow!(
            "the write was rolled back ({why}); retry"
        ))),
        (Ok(()), None) => Err(StoreError::Other(anyhow::anyhow!("the write never ran"))),
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
        self.submit(
            Box::new(Typed {
                work: Some(work),
                outcome: None,
                reply,
            }),
            answer,
        )
        .await
    }

    /// Runs `piece` in a write transaction, in one command with the other pieces of its
    /// text that queue up with it; its answer once that has committed.
    pub async fn write_piece<P: Piece>(&self, piece: P) -> StoreResult<P::Output> {
        let (reply, answer) = oneshot::channel();
        self.submit(
            Box::new(PieceJob {
                piece: Some(Box::new(piece)),
                outcome: None,
                reply,
            }),
            answer,
        )
        .await
    }

    async fn submit<T>(
        &self,
        job: Box<dyn Job>,
        answer: oneshot::Receiver<StoreResult<T>>,
    ) -> StoreResult<T> {
        let gone = || StoreError::Unavailable(anyhow::anyhow!("the SQLite writer has stopped"));
        self.jobs.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::UnboundedReceiver<Box<dyn Job>>) {
    let mut texts = Texts::default();
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = run_batch(&pool, &mut batch, &mut texts).await;
        for job in batch {
            job.finish(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        }
    }
    pool.close().await;
}

/// The text of `n` pieces in one command, made once per text and count.
#[derive(Default)]
struct Texts(HashMap<(&'static str, usize), Arc<str>>);

impl Texts {
    fn repeated(&mut self, sql: &'static str, n: usize) -> Arc<str> {
        self.0
            .entry((sql, n))
            .or_insert_with(|| {
                let mut text = String::with_capacity((sql.len() + 2) * n);
                for _ in 0..n {
                    text.push_str(sql.trim_end().trim_end_matches(';'));
                    text.push_str(";\n");
                }
                text.into()
            })
            .clone()
    }
}

/// Runs every job of the batch in one transaction; why it did not commit, if it did not.
async fn run_batch(
    pool: &SqlitePool,
    batch: &mut [Box<dyn Job>],
    texts: &mut Texts,
) -> Result<(), String> {
    let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| e.to_string())?;
    let mut rest = &mut batch[..];
    while !rest.is_empty() {
        // The pieces of one text at the head of the queue, as many as fit one command.
        let sql = rest[0].piece_sql();
        let same = match sql {
            Some(sql) => rest
                .iter()
                .take(MAX_PIECES)
                .take_while(|j| j.piece_sql() == Some(sql))
                .count(),
            None => 0,
        };
        let taken = match sql {
            Some(_) if same > 1 => 1 << same.ilog2(),
            _ => 1,
        };
        let (head, tail) = rest.split_at_mut(taken);
        rest = tail;
        let ok = match sql {
            Some(sql) if taken > 1 => run_pieces(&mut tx, sql, head, texts).await,
            _ => head[0].run(&mut tx).await,
        };
        if !ok {
            tx.rollback().await.ok();
            return Err("another write of its transaction failed".into());
        }
    }
    tx.commit().await.map_err(|e| e.to_string())
}

/// Runs pieces of one text as one command; false when any of them failed.
async fn run_pieces(
    conn: &mut SqliteConnection,
    sql: &'static str,
    pieces: &mut [Box<dyn Job>],
    texts: &mut Texts,
) -> bool {
    let mut args = SqliteArguments::default();
    for (slot, piece) in pieces.iter_mut().enumerate() {
        if let Err(e) = piece.bind(slot as i64, &mut args) {
            return piece.settle(Err(sqlx::Error::Encode(e)));
        }
    }
    let text = texts.repeated(sql, pieces.len());
    let rows = match sqlx::query_with(AssertSqlSafe(text), args)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        // The others are told that their transaction was rolled back.
        Err(e) => return pieces[0].settle(Err(e)),
    };
    let mut found: Vec<Option<&SqliteRow>> = vec![None; pieces.len()];
    for row in &rows {
        match row.try_get::<i64, _>(0) {
            Ok(slot) if (0..pieces.len() as i64).contains(&slot) => {
                found[slot as usize] = Some(row)
            }
            _ => {
                let bad = sqlx::Error::Protocol("a piece's row has no valid slot".into());
                return pieces[0].settle(Err(bad));
            }
        }
    }
    let mut ok = true;
    for (piece, row) in pieces.iter_mut().zip(found) {
        ok &= piece.settle(Ok(row));
    }
    ok
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
