//! Cluster mode, end to end: three real `relay` processes on one database
//! and a private Redis, clients choosing the node per connection as a load
//! balancer would, and a checker holding every outcome and delivery to the
//! contracts (see `checker`). Each scenario is bounded (about 30 s at most
//! on 2 cores).

mod checker;
mod scenarios;
mod support;
mod traffic;
