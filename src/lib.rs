//! signal-relay: a Signal Protocol relay server.
//!
//! Clients hold one authenticated WebSocket each and speak protobuf frames
//! (`proto/relay.proto`). The relay keeps the public pre-keys that let one
//! client start a session with another, and relays opaque encrypted
//! messages: live when the recipient is connected, through a durable
//! PostgreSQL queue when not. It never sees plaintext.
//!
//! Where things live:
//! - [`protocol`] — wire types, status codes, protocol errors;
//! - [`server`] — listener, TLS, HTTP upgrade, shutdown;
//! - [`connection`] — one socket's frames and life;
//! - [`cmd`] — one file per request kind;
//! - [`registry`] — who is online; where each message goes;
//! - [`messages`] — storing, draining, expiring, deduplicating messages;
//! - [`keys`] — the pre-key directory and libsignal-exact validation;
//! - [`auth`] — passwords, sessions;
//! - [`storage`] — PostgreSQL;
//! - [`client`] — a typed async client, used by tests, the CLI and the bench.

pub mod auth;
pub mod client;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod keys;
pub mod messages;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use protocol::proto;
