//! Failures a user or a script must be able to tell apart, each with its own
//! exit code. Everything else is a plain `anyhow` error and exits with 1.
//!
//! A command returns `anyhow::Error`; `main` looks through its chain for a
//! [`Failure`] (raised where the cause is known) or a relay
//! [`ClientError`] (classified here), so the code and the message always
//! agree.

use std::process::ExitCode;

use signal_relay::client::ClientError;
use signal_relay::proto::Status;

/// What kind of failure ended the command; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything not listed below.
    Other,
    /// The relay could not be reached, refused the connection, or dropped it.
    Unreachable,
    /// Wrong username or password, or the saved session token was rejected.
    BadCredentials,
    /// No such user on the relay.
    UnknownUser,
    /// The user exists but has published no keys, so nothing can be
    /// encrypted to them yet.
    NoKeys,
    /// A peer's identity key (or the account behind their username) changed.
    IdentityChanged,
    /// The profile is missing something (not registered) or is in use.
    Profile,
    /// Another device holds this account's identity on the relay: a login
    /// that would take it over without `--replace-device`, or a device
    /// whose identity another one replaced.
    OtherDevice,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Other => 1,
            // 2 is clap's code for usage errors.
            Kind::Unreachable => 3,
            Kind::BadCredentials => 4,
            Kind::UnknownUser => 5,
            Kind::IdentityChanged => 6,
            Kind::Profile => 7,
            Kind::NoKeys => 8,
            Kind::OtherDevice => 9,
        }
    }

    /// Stable name for `--json` error objects.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "error",
            Kind::Unreachable => "server_unreachable",
            Kind::BadCredentials => "bad_credentials",
            Kind::UnknownUser => "unknown_user",
            Kind::IdentityChanged => "identity_changed",
            Kind::Profile => "profile",
            Kind::NoKeys => "no_keys",
            Kind::OtherDevice => "other_device",
        }
    }
}

/// A failure whose kind is known where it happens.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }

    pub fn unknown_user(user: &str) -> Self {
        Failure::new(
            Kind::UnknownUser,
            format!("no user named {user:?} on this relay"),
        )
    }

    pub fn no_keys(user: &str) -> Self {
        Failure::new(
            Kind::NoKeys,
            format!(
                "{user} has not published keys yet, so nothing can be encrypted to them; \
                 any relay-cli command they run (e.g. `relay-cli keys`) publishes them"
            ),
        )
    }

    pub fn profile(message: impl Into<String>) -> Self {
        Failure::new(Kind::Profile, message)
    }
}

/// The kind of an error: the first [`Failure`] or [`ClientError`] in its
/// chain decides.
pub fn classify(err: &anyhow::Error) -> Kind {
    for cause in err.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return failure.kind;
        }
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            return client_kind(client);
        }
    }
    Kind::Other
}

fn client_kind(err: &ClientError) -> Kind {
    match err {
        ClientError::Connect { .. }
        | ClientError::Tls(_)
        | ClientError::Http { .. }
        | ClientError::WebSocket(_)
        | ClientError::Closed { .. } => Kind::Unreachable,
        ClientError::Status { status, .. } => match status {
            Status::Unauthorized => Kind::BadCredentials,
            // Shutting down or overloaded: as good as unreachable right now.
            Status::Unavailable => Kind::Unreachable,
            _ => Kind::Other,
        },
        ClientError::Url(_)
        | ClientError::UnexpectedResponse
        | ClientError::Encode(_)
        | ClientError::NoLane => Kind::Other,
    }
}

/// The process exit code for a kind.
pub fn exit_code(kind: Kind) -> ExitCode {
    ExitCode::from(kind.exit_code())
}
