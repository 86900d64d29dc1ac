//! The Redis connection every command of the denylist and the login budgets goes
//! through: timing each command or pipeline and counting failures into the server's
//! metrics. To one address it is the shared [`ConnectionManager`] (which reconnects by
//! itself); behind Redis Sentinel it is a connection to the primary the sentinels name,
//! dropped on a connection error or a `READONLY` answer (a demoted primary) so that the
//! next command asks the sentinels again and reaches the promoted replica.

use std::sync::{Arc, Mutex};

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tessera_marks::Source;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Measured {
    to: To,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
enum To {
    One(ConnectionManager),
    Primary(Arc<Primary>),
}

/// The sentinels' primary of the moment, connected on first use.
pub struct Primary {
    source: Source,
    config: AsyncConnectionConfig,
    current: Mutex<Option<MultiplexedConnection>>,
}

impl Primary {
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(conn);
        }
        let client = self.source.client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// After `e`: drops the connection when it is lost or no longer the primary's, so
    /// that the next command asks the sentinels again.
    fn failed(&self, e: &RedisError) {
        let lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        if lost {
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    async fn run<T>(
        &self,
        call: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let mut conn = self.connection().await?;
        let result = call(&mut conn).await;
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }
}

impl Measured {
    pub fn new(conn: ConnectionManager) -> Self {
        Measured {
            to: To::One(conn),
            metrics: Default::default(),
        }
    }

    /// Behind Sentinel: `source` names the primary; `config` bounds connecting and
    /// each answer.
    pub fn primary_of(source: Source, config: AsyncConnectionConfig) -> Self {
        Measured {
            to: To::Primary(Arc::new(Primary {
                source,
                config,
                current: Mutex::new(None),
            })),
            metrics: Default::default(),
        }
    }

    pub fn reporting_to(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }
}

impl ConnectionLike for Measured {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Measured { to, metrics } = self;
        match to {
            To::One(conn) => Box::pin(metrics.redis(conn.req_packed_command(cmd))),
            To::Primary(primary) => Box::pin(metrics.redis(async move {
                primary
                    .run(async |conn: &mut MultiplexedConnection| {
                        conn.req_packed_command(cmd).await
                    })
                    .await
            })),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Measured { to, metrics } = self;
        match to {
            To::One(conn) => {
                Box::pin(metrics.redis(conn.req_packed_commands(pipeline, offset, count)))
            }
            To::Primary(primary) => Box::pin(metrics.redis(async move {
                primary
                    .run(async |conn: &mut MultiplexedConnection| {
                        conn.req_packed_commands(pipeline, offset, count).await
                    })
                    .await
            })),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.to {
            To::One(conn) => conn.get_db(),
            To::Primary(_) => 0,
        }
    }
}
