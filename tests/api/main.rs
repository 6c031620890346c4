//! Integration tests: each test gets its own PostgreSQL database and a real
//! server on port 0, and speaks to it over real WebSockets through the
//! library's client.

mod abuse;
mod admin;
mod auth;
mod connection;
mod crash;
mod deploy;
mod helpers;
mod json;
mod keys;
mod messaging;
mod operations;
mod outage;
mod proxy;
mod shutdown;
mod storage;
mod tls;
mod violations;
