//! signal-relay: a Signal Protocol relay server.
//!
//! Clients hold one authenticated WebSocket each and speak protobuf frames
//! (`proto/relay.proto`). The relay keeps the public pre-keys that let one
//! client start a session with another, and relays opaque encrypted
//! messages: live when the recipient is connected, through a durable
//! PostgreSQL queue when not. It never sees plaintext.
//!
//! Where things live, top layer first; each module uses only those below
//! it:
//! - [`admin`] — the `relay` binary's admin subcommands (migrate,
//!   check-config, users), on the database directly;
//! - [`server`] — listener, TLS, HTTP upgrade, the sweeper, shutdown;
//! - [`connection`] — one socket's frames and life;
//! - [`cmd`] — one file per request kind;
//! - [`state`] — what every connection shares;
//! - [`messages`] — the messaging front: routing, storing, draining,
//!   hand-backs, who is online;
//! - [`keys`] — the pre-key directory and libsignal-exact validation;
//! - [`auth`] — passwords, sessions, credentials;
//! - [`storage`] — PostgreSQL, and its batch workers;
//! - [`envelope`] — the relayed message every layer above knows;
//! - [`health`], [`metrics`] — liveness and readiness, Prometheus metrics;
//! - [`protocol`], [`config`], [`ratelimit`] — wire types and close codes,
//!   settings, token buckets;
//! - [`client`] — a typed async client, used by tests, the CLI and the bench.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod envelope;
pub mod health;
pub mod idhash;
pub mod keys;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use protocol::proto;
