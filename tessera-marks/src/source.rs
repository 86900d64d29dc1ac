//! Where Redis is: one address (`redis://`, `rediss://`), or the current primary of a
//! service that Redis Sentinel watches (`redis+sentinel://`), asked of the sentinels
//! every time a connection is made, so that a reconnection after a failover reaches the
//! promoted replica.
//!
//! `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`: the
//! sentinels' addresses, the service name they monitor (`sentinel monitor <service>
//! ...`), and the database; the credentials are the Redis nodes' (the sentinels are
//! asked without any).

use std::sync::Arc;

use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{ErrorKind, RedisConnectionInfo, RedisError, RedisResult};

#[derive(Clone)]
pub enum Source {
    Direct(Box<redis::Client>),
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

fn invalid(why: &'static str) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, why))
}

impl Source {
    /// `url` with, for `rediss://`, `ca_pem` (see [`crate::client`]).
    pub fn parse(url: &str, ca_pem: Option<&[u8]>) -> RedisResult<Source> {
        let Some(rest) = url.strip_prefix("redis+sentinel://") else {
            return crate::client(url, ca_pem).map(|c| Source::Direct(Box::new(c)));
        };
        if ca_pem.is_some() {
            return Err(invalid("TLS is not supported with redis+sentinel:// here"));
        }
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("redis+sentinel:// needs /<service name> after the hosts"))?;
        let (service, db) = match path.split_once('/') {
            Some((service, db)) => (service, db.parse::<i64>().ok()),
            None => (path, Some(0)),
        };
        let db =
            db.ok_or_else(|| invalid("redis+sentinel://.../<service>/<db>: db is a number"))?;
        if service.is_empty() {
            return Err(invalid(
                "redis+sentinel:// needs /<service name> after the hosts",
            ));
        }
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        if sentinels.is_empty() {
            return Err(invalid("redis+sentinel:// names no sentinel"));
        }
        let mut node = RedisConnectionInfo::default().set_db(db);
        if let Some(userinfo) = userinfo {
            let (user, password) = userinfo.split_once(':').unwrap_or(("", userinfo));
            if !user.is_empty() {
                node = node.set_username(decode(user)?);
            }
            if !password.is_empty() {
                node = node.set_password(decode(password)?);
            }
        }
        let client = SentinelClient::build(
            sentinels,
            service,
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node)),
            SentinelServerType::Master,
        )?;
        Ok(Source::Sentinel(Arc::new(tokio::sync::Mutex::new(client))))
    }

    /// A client for the Redis to talk to now: the one address, or the primary the
    /// sentinels name at this moment (checked with `ROLE`).
    pub async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Source::Direct(client) => Ok((**client).clone()),
            Source::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await,
        }
    }

    pub fn is_sentinel(&self) -> bool {
        matches!(self, Source::Sentinel(_))
    }
}

/// Percent-decoding of a URL's user or password.
fn decode(part: &str) -> RedisResult<String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid("a bad %-escape in the redis+sentinel:// credentials"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid("the redis+sentinel:// credentials are not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse_and_bad_ones_say_why() {
        assert!(
            Source::parse(
                "redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26379/main/2",
                None
            )
            .unwrap()
            .is_sentinel()
        );
        assert!(
            !Source::parse("redis://127.0.0.1:6379", None)
                .unwrap()
                .is_sentinel()
        );
        for bad in [
            "redis+sentinel://10.0.0.1:26379",
            "redis+sentinel://10.0.0.1:26379/",
            "redis+sentinel:///main",
            "redis+sentinel://10.0.0.1:26379/main/x",
        ] {
            assert!(Source::parse(bad, None).is_err(), "{bad}");
        }
        assert_eq!(decode("p%40ss%2Fw").unwrap(), "p@ss/w");
    }
}
