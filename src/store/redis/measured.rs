//! The Redis connection every command of the denylist and the login budgets goes
//! through: the shared [`ConnectionManager`], timing each command or pipeline and
//! counting failures into the server's metrics.

use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Measured {
    conn: ConnectionManager,
    metrics: Arc<Metrics>,
}

impl Measured {
    pub fn new(conn: ConnectionManager) -> Self {
        Measured {
            conn,
            metrics: Default::default(),
        }
    }

    pub fn reporting_to(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }
}

impl ConnectionLike for Measured {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let Measured { conn, metrics } = self;
        Box::pin(metrics.redis(conn.req_packed_command(cmd)))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let Measured { conn, metrics } = self;
        Box::pin(metrics.redis(conn.req_packed_commands(pipeline, offset, count)))
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
