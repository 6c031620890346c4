//! The key directory: validation of uploaded pre-keys exactly as libsignal
//! does it, and the bundle a sender fetches to start a session.

pub mod xeddsa;
