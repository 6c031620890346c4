//! Reaching the relay through the library's typed client: which server,
//! connecting (ws:// or wss:// with an optional CA), authenticating with the
//! saved token, and turning the client's errors into messages a user can act
//! on.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use signal_relay::client::{AuthInfo, Client, ClientError, ConnectOptions, Events, UserInfo};
use signal_relay::proto::Status;

use crate::error::{Failure, Kind};
use crate::profile::Account;

/// Where `relay` listens by default.
pub const DEFAULT_SERVER: &str = "ws://127.0.0.1:8080/v1/websocket";

/// The relay's default message size limit, assumed when a relay does not
/// state its own.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 96 * 1024;

/// Connecting and authenticating; beyond this the relay counts as
/// unreachable (a dropped SYN would otherwise hang for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Any single request. A send waits for the recipient's ack, which the relay
/// bounds at a few seconds, so this only trips on a stuck connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A relay to talk to.
#[derive(Debug, Clone)]
pub struct Server {
    /// `ws://host:port/v1/websocket` or `wss://…`.
    pub url: String,
    /// PEM CA certificate to trust for `wss://` instead of the system roots.
    pub ca_cert: Option<PathBuf>,
}

impl Server {
    /// `--server` wins, then the profile's account, then the default. The
    /// CA saved with the account still applies when `--server` names the
    /// same relay.
    pub fn choose(
        flag: Option<&str>,
        ca_flag: Option<PathBuf>,
        account: Option<&Account>,
    ) -> Result<Server> {
        let url = normalize(
            flag.or(account.map(|a| a.server.as_str()))
                .unwrap_or(DEFAULT_SERVER),
        )?;
        let saved_ca = account
            .filter(|a| a.server == url)
            .and_then(|a| a.ca_cert.clone());
        Ok(Server {
            url,
            ca_cert: ca_flag.or(saved_ca),
        })
    }
}

/// Accepts `ws://host:port` as shorthand for the relay's WebSocket path and
/// rejects other schemes with a clear message.
pub fn normalize(url: &str) -> Result<String> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!(
                "--server {url:?} is not a URL ({e}); expected ws://host:port or wss://host:port"
            ),
        )
    })?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err(Failure::new(
            Kind::Other,
            format!(
                "--server must start with ws:// or wss://, not {}://",
                parsed.scheme()
            ),
        )
        .into());
    }
    if parsed.path().is_empty() || parsed.path() == "/" {
        parsed.set_path("/v1/websocket");
    }
    Ok(parsed.to_string())
}

/// Runs a request with [`REQUEST_TIMEOUT`]. Errors stay `ClientError`s
/// inside the `anyhow::Error`, so [`status`] and `error::classify` see them.
pub async fn within<T>(request: impl Future<Output = Result<T, ClientError>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Failure::new(
            Kind::Unreachable,
            format!(
                "the relay did not answer within {}s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )
        .into()),
    }
}

/// The relay's status, if the error is the relay answering with one.
pub fn status(err: &anyhow::Error) -> Option<Status> {
    err.chain()
        .find_map(|c| c.downcast_ref::<ClientError>())
        .and_then(ClientError::status)
}

/// Opens an unauthenticated connection.
pub async fn connect(server: &Server) -> Result<(Client, Events)> {
    let options = ConnectOptions {
        ca_cert: server.ca_cert.clone(),
        ..ConnectOptions::default()
    };
    let unreachable = |detail: String| {
        Failure::new(
            Kind::Unreachable,
            format!("cannot reach the relay at {}: {detail}", server.url),
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with(&server.url, options)).await {
        Err(_) => Err(unreachable(format!(
            "no connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))
        .into()),
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(ClientError::Url(e))) => Err(Failure::new(
            Kind::Other,
            format!("invalid server URL {}: {}", server.url, describe(&e)),
        )
        .into()),
        Ok(Err(ClientError::Tls(e))) => Err(unreachable(format!(
            "TLS failed: {}{}",
            describe(&e),
            if server.ca_cert.is_none() {
                " (for a server with a local CA, pass --ca-cert FILE)"
            } else {
                ""
            }
        ))
        .into()),
        Ok(Err(e)) => Err(unreachable(describe(&e)).into()),
    }
}

/// An error and its causes on one line.
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Connects and authenticates with the profile's session token; the
/// relay's answer says what it allows (the message size limit).
pub async fn resume(server: &Server, account: &Account) -> Result<(Client, Events, AuthInfo)> {
    let login_again = |why: &str| {
        Failure::new(
            Kind::BadCredentials,
            format!(
                "{why}; run `relay-cli login {}` to sign in again",
                account.username
            ),
        )
    };
    let Some(token) = &account.token else {
        return Err(login_again(&format!("{} is logged out", account.username)).into());
    };
    let token = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| login_again("the saved session token is corrupt"))?;
    let (client, events) = connect(server).await?;
    match within(client.resume(&token)).await {
        Ok(auth) => Ok((client, events, auth)),
        Err(e) if status(&e) == Some(Status::Unauthorized) => {
            let expired = account.token_expires_at_ms > 0
                && account.token_expires_at_ms < chrono::Utc::now().timestamp_millis();
            Err(login_again(if expired {
                "the saved session has expired"
            } else {
                "the relay rejected the saved session (logged out elsewhere, or the account was deleted)"
            })
            .into())
        }
        Err(e) => Err(e.context("resuming the saved session")),
    }
}

/// Looks `user` up on the relay, consuming none of their keys. A name
/// nobody has (or that no one could have) is [`Failure::unknown_user`].
pub async fn lookup(client: &Client, user: &str) -> Result<UserInfo> {
    match within(client.lookup_user(user)).await {
        Ok(info) => Ok(info),
        Err(e) if matches!(status(&e), Some(Status::NotFound | Status::BadRequest)) => {
            Err(Failure::unknown_user(user).into())
        }
        Err(e) if status(&e) == Some(Status::RateLimited) => Err(e.context(format!(
            "the relay limits how fast users may be looked up; try again shortly to reach {user}"
        ))),
        Err(e) => Err(e.context(format!("looking up {user}"))),
    }
}

/// The token from register/login, as saved in the profile.
pub fn encode_token(auth: &AuthInfo) -> String {
    URL_SAFE_NO_PAD.encode(&auth.token)
}
