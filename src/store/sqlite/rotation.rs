//! A refresh token's rotation on SQLite: six statements (`rotate.sql`) that run as one
//! command, alone through the compile-time checked `query_file!`, or several rotations
//! in one command when they queue up together (see [`super::writer::Piece`]).
//!
//! The writer lock is the race arbiter: of two requests presenting the same token, the
//! second runs after the first (in a later transaction, or later in the same command),
//! finds it rotated, and changes nothing. The first statement marks the token rotated
//! only if it and its session are live; the others act only where it did (the
//! successor's hash, fresh and random, names this rotation); the last returns the
//! grant, or nothing. `rotated_at` is the clock once the write lock is held.

use sqlx::error::BoxDynError;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Row, SqliteConnection};

use super::writer::{BoxFuture, Piece};
use super::{now_us, secs_us};
use crate::store::{AuditKind, Rotation};

const SQL: &str = include_str!("rotate.sql");

/// One rotation, with everything it binds owned (it runs on the writer's thread).
pub struct RotationPiece {
    token: Vec<u8>,
    successor: Vec<u8>,
    sealed: Vec<u8>,
    ip: Option<String>,
    user_agent: Option<String>,
    idle_ttl_secs: i64,
    grace_secs: i64,
    audit: bool,
    /// The clock when the piece was bound (inside its transaction).
    now: i64,
}

/// The granted session as stored, with the rotation's time.
pub struct Rotated {
    pub session_id: String,
    pub user_id: String,
    pub expires_at: i64,
    pub remember_me: bool,
    pub roles: String,
    pub now: i64,
}

impl RotationPiece {
    pub fn new(r: &Rotation<'_>) -> Self {
        RotationPiece {
            token: r.token_hash.to_vec(),
            successor: r.successor_hash.to_vec(),
            sealed: r.successor_sealed.to_vec(),
            ip: r.client.ip.clone(),
            user_agent: r.client.user_agent.clone(),
            idle_ttl_secs: r.idle_ttl_secs,
            grace_secs: r.grace_secs,
            audit: r.audit,
            now: 0,
        }
    }
}

impl Piece for RotationPiece {
    type Output = Option<Rotated>;

    fn sql(&self) -> &'static str {
        SQL
    }

    fn bind(&mut self, slot: i64, args: &mut SqliteArguments) -> Result<(), BoxDynError> {
        self.now = now_us();
        let (now, t, s) = (self.now, &self.token, &self.successor);
        // the rotation
        args.add(now)?;
        args.add(s.clone())?;
        args.add(self.sealed.clone())?;
        args.add(t.clone())?;
        args.add(now)?;
        args.add(now - secs_us(self.idle_ttl_secs))?;
        // the session's use
        args.add(now)?;
        args.add(self.ip.clone())?;
        args.add(self.user_agent.clone())?;
        args.add(t.clone())?;
        args.add(s.clone())?;
        // the successor
        args.add(s.clone())?;
        args.add(now)?;
        args.add(t.clone())?;
        args.add(s.clone())?;
        // the pruning
        args.add(t.clone())?;
        args.add(s.clone())?;
        args.add(t.clone())?;
        args.add(now - secs_us(self.grace_secs))?;
        // the audit row
        args.add(now)?;
        args.add(AuditKind::Refresh.as_str())?;
        args.add(self.ip.clone())?;
        args.add(self.user_agent.clone())?;
        args.add(self.audit)?;
        args.add(t.clone())?;
        args.add(s.clone())?;
        // the grant
        args.add(slot)?;
        args.add(t.clone())?;
        args.add(s.clone())?;
        Ok(())
    }

    fn read(&mut self, row: Option<&SqliteRow>) -> Result<Option<Rotated>, sqlx::Error> {
        row.map(|row| {
            Ok(Rotated {
                session_id: row.try_get("session_id")?,
                user_id: row.try_get("user_id")?,
                expires_at: row.try_get("expires_at")?,
                remember_me: row.try_get("remember_me")?,
                roles: row.try_get("roles")?,
                now: self.now,
            })
        })
        .transpose()
    }

    fn alone(
        self: Box<Self>,
        conn: &mut SqliteConnection,
    ) -> BoxFuture<'_, Result<Option<Rotated>, sqlx::Error>> {
        Box::pin(async move {
            let now = now_us();
            let (t, s) = (&self.token, &self.successor);
            let row = sqlx::query_file!(
                "src/store/sqlite/rotate.sql",
                // the rotation
                now,
                s,
                self.sealed,
                t,
                now,
                now - secs_us(self.idle_ttl_secs),
                // the session's use
                now,
                self.ip,
                self.user_agent,
                t,
                s,
                // the successor
                s,
                now,
                t,
                s,
                // the pruning
                t,
                s,
                t,
                now - secs_us(self.grace_secs),
                // the audit row
                now,
                AuditKind::Refresh.as_str(),
                self.ip,
                self.user_agent,
                self.audit,
                t,
                s,
                // the grant
                0i64,
                t,
                s,
            )
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.map(|r| Rotated {
                session_id: r.session_id,
                user_id: r.user_id,
                expires_at: r.expires_at,
                remember_me: r.remember_me,
                roles: r.roles,
                now,
            }))
        })
    }
}
