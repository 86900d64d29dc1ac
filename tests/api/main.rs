//! Black-box tests: every test spawns the real application over HTTP against real
//! PostgreSQL and Redis, with its own database and Redis key prefix.

mod admin;
mod audit;
mod browser;
mod cleanup;
mod cookies;
mod devices;
mod downstream;
mod embedded;
mod eviction;
mod forged_tokens;
mod forwarded;
mod health_and_metadata;
mod helpers;
mod in_process;
mod input;
mod introspect;
mod keys;
mod layering;
mod local_copy;
mod login;
mod logout;
mod logs;
mod multi_instance;
mod outage;
mod password;
mod races;
mod refresh;
mod revoke;
mod scripts;
mod sessions;
mod shared_throttle;
mod storage;
mod timing;
mod users;
